"""Small pure pieces: order numbers, error codes, rate limiter, stock line parsing, tier prices."""

from __future__ import annotations

import re
import string
import threading
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kameng import ratelimit
from kameng.errors import (
    HTTP_STATUS,
    MESSAGES,
    ErrorCode,
    KamengError,
    field_error,
    normalize_language,
)
from kameng.inventory.service import MAX_KEY_LENGTH, is_blank_or_comment, parse_line
from kameng.orders.numbers import CROCKFORD, new_lookup_secret, new_order_no, normalize_order_no
from kameng.pricing.models import TierPrice
from kameng.pricing.service import compute_price
from kameng.ratelimit import RateLimiter

# == order numbers ==============================================================================

ORDER_NO = re.compile(r"K\d{8}[0-9A-HJKMNP-TV-Z]{10}")
NOW = datetime(2026, 11, 26, 23, 59, 59, tzinfo=UTC)


def test_crockford_alphabet() -> None:
    """No I, L, O, U: nothing a buyer can misread when copying an order number."""
    assert len(CROCKFORD) == 32
    assert len(set(CROCKFORD)) == 32
    assert not set(CROCKFORD) & set("ILOU")
    assert set(CROCKFORD) <= set(string.digits + string.ascii_uppercase)


def test_order_no_format() -> None:
    number = new_order_no(NOW)
    assert ORDER_NO.fullmatch(number), number
    assert number.startswith("K20261126")
    assert len(number) == 19


def test_order_no_date_is_zero_padded() -> None:
    assert new_order_no(datetime(2027, 1, 5, tzinfo=UTC)).startswith("K20270105")


def test_order_numbers_unique_and_every_position_random() -> None:
    """100k numbers: no collision, and each of the 10 positions uses the whole alphabet."""
    numbers = [new_order_no(NOW) for _ in range(100_000)]
    assert len(set(numbers)) == len(numbers)
    assert all(ORDER_NO.fullmatch(n) for n in numbers[:1000])
    for position in range(9, 19):
        assert {n[position] for n in numbers} == set(CROCKFORD), position


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("K20261126ABCDEFGHJK", "K20261126ABCDEFGHJK"),
        ("k20261126abcdefghjk", "K20261126ABCDEFGHJK"),
        ("K20261126-ABCDE-FGHJK", "K20261126ABCDEFGHJK"),
        ("  K 2026 1126 ABCDE FGHJK  ", "K20261126ABCDEFGHJK"),
        ("K-20261126-ABCDEFGHJK", "K20261126ABCDEFGHJK"),
        ("K20261126OoIiLl0011", "K20261126001111" + "0011"),
        ("k20261126-7xq3m9pd2a", "K202611267XQ3M9PD2A"),
    ],
)
def test_normalize_order_no(typed: str, expected: str) -> None:
    assert normalize_order_no(typed) == expected


def test_normalize_only_touches_the_random_part() -> None:
    """The 'K' and the date are not Crockford: an O or L there is not silently turned into 0/1."""
    assert normalize_order_no("K2O26112600000000OO") == "K2O2611260000000000"
    assert normalize_order_no("KL0261126ABCDEFGHJK").startswith("KL0261126")


@settings(max_examples=300)
@given(st.data())
def test_normalize_undoes_what_buyers_type(data: st.DataObject) -> None:
    """Any mix of case, dashes, spaces and O/I/L look-alikes maps back to the real number."""
    tail = data.draw(st.text(alphabet=CROCKFORD, min_size=10, max_size=10))
    original = f"K20261126{tail}"
    typed = original[:9]
    for ch in original[9:]:
        options = [ch, ch.lower()]
        if ch == "0":
            options += ["O", "o"]
        if ch == "1":
            options += ["I", "i", "L", "l"]
        typed += data.draw(st.sampled_from(options))
        typed += data.draw(st.sampled_from(["", "", "-", " "]))
    if data.draw(st.booleans()):
        typed = typed.lower()
    assert normalize_order_no(f"  {typed} ") == original
    assert normalize_order_no(original) == original


def test_lookup_secret_format_and_uniqueness() -> None:
    secrets_ = {new_lookup_secret() for _ in range(2000)}
    assert len(secrets_) == 2000
    for secret in list(secrets_)[:200]:
        assert re.fullmatch(r"([0-9A-HJKMNP-TV-Z]{4}-){3}[0-9A-HJKMNP-TV-Z]{4}", secret)


# == errors =====================================================================================


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_code_has_both_messages_and_a_status(code: ErrorCode) -> None:
    """Resellers branch on codes; a code without text or status is a broken contract."""
    zh, en = MESSAGES[code]
    assert zh.strip()
    assert en.strip()
    assert zh != en
    assert re.search(r"[\u4e00-\u9fff]", zh), f"zh message of {code} has no Chinese"
    assert not re.search(r"[\u4e00-\u9fff]", en), f"en message of {code} contains Chinese"
    assert 400 <= HTTP_STATUS[code] <= 599
    assert code.value == code.name


def test_no_stray_entries_in_tables() -> None:
    assert set(MESSAGES) == set(ErrorCode)
    assert set(HTTP_STATUS) == set(ErrorCode)


def _placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


@pytest.mark.parametrize("code", list(ErrorCode))
def test_both_languages_use_the_same_placeholders(code: ErrorCode) -> None:
    """Otherwise one language silently shows a raw '{placeholder}' for the same error."""
    zh, en = MESSAGES[code]
    assert _placeholders(zh) == _placeholders(en)


@pytest.mark.parametrize("code", list(ErrorCode))
def test_messages_format_without_params(code: ErrorCode) -> None:
    """A missing param must never turn an error into a KeyError (a 500 on top of a 4xx)."""
    error = KamengError(code)
    for language in ("zh-CN", "en"):
        text = error.message(language)
        assert text == MESSAGES[code][0 if language == "zh-CN" else 1]
    assert str(error) == MESSAGES[code][1]
    assert error.to_dict()["error"]["code"] == code.value


@pytest.mark.parametrize("code", list(ErrorCode))
def test_messages_format_with_all_params(code: ErrorCode) -> None:
    params = {name: f"<{name}>" for name in _placeholders(MESSAGES[code][1])}
    error = KamengError(code, **params)
    for language in ("zh-CN", "en"):
        text = error.message(language)
        assert "{" not in text
        for value in params.values():
            assert value in text


def test_partial_params_do_not_crash() -> None:
    error = KamengError(ErrorCode.insufficient_balance, needed="1.00")
    assert error.message("en") == MESSAGES[ErrorCode.insufficient_balance][1]


def test_param_values_with_braces_are_not_reinterpreted() -> None:
    error = KamengError(ErrorCode.invalid_request, detail="{0} {missing}")
    assert error.message("en") == "Invalid request: {0} {missing}"


def test_error_to_dict_and_status() -> None:
    error = KamengError(
        ErrorCode.rate_limited,
        retry_after=7,
        extra={
            "retry_after": 7,
            "fields": [field_error("phone", "format", "手机号不对", "bad phone"), "raw"],
        },
    )
    assert error.http_status == 429
    en = error.to_dict("en")["error"]
    assert en["code"] == "rate_limited"
    assert en["message"] == "Too many requests, retry in 7 s"
    assert en["retry_after"] == 7
    assert en["fields"] == [{"field": "phone", "code": "format", "message": "bad phone"}, "raw"]
    zh = error.to_dict("zh-CN")["error"]
    assert zh["message"] == "请求过于频繁，请 7 秒后再试"
    assert zh["fields"][0]["message"] == "手机号不对"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("en-US,en;q=0.9", "en"),
        ("en", "en"),
        ("EN-gb", "en"),
        ("zh-CN", "zh-CN"),
        ("zh-CN,zh;q=0.9,en;q=0.8", "zh-CN"),
        ("zh-TW", "zh-CN"),
        ("en;q=0.5,zh-CN;q=0.8", "zh-CN"),
        ("zh-CN;q=0.3,en;q=0.7", "en"),
        ("fr-FR,fr;q=0.9,en;q=0.4", "en"),
        ("fr", "zh-CN"),
        ("de-DE,fr;q=0.5", "zh-CN"),
        ("*", "zh-CN"),
        ("", "zh-CN"),
        (None, "zh-CN"),
        ("garbage;;;,,,", "zh-CN"),
        (";q=1", "zh-CN"),
        ("en;q=abc,zh;q=0.1", "zh-CN"),
        ("\x00\xff", "zh-CN"),
    ],
)
def test_normalize_language(header: str | None, expected: str) -> None:
    assert normalize_language(header) == expected


def test_normalize_language_custom_default() -> None:
    assert normalize_language("fr", default="en") == "en"
    assert normalize_language(None, default="en") == "en"
    assert normalize_language("zh", default="en") == "zh-CN"


def test_normalize_language_q_zero_means_not_acceptable() -> None:
    assert normalize_language("en;q=0", default="zh-CN") == "zh-CN"
    assert normalize_language("zh;q=0", default="en") == "en"


def test_normalize_language_q_with_whitespace() -> None:
    assert normalize_language("zh-CN; q=0.5, en; q=0.9") == "en"


@settings(max_examples=300)
@given(st.text(max_size=60))
def test_normalize_language_never_crashes(header: str) -> None:
    assert normalize_language(header) in {"zh-CN", "en"}


# == rate limiter ===============================================================================


class FakeTime:
    """Stands in for the `time` module inside kameng.ratelimit."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(ratelimit, "time", fake)
    return fake


def _limited(limiter: RateLimiter, key: str) -> KamengError:
    with pytest.raises(KamengError) as info:
        limiter.check(key)
    assert info.value.code is ErrorCode.rate_limited
    assert info.value.http_status == 429
    return info.value


def test_limit_reached_raises_rate_limited_with_retry_after() -> None:
    limiter = RateLimiter(limit=3, window_s=0.2)
    for _ in range(3):
        limiter.check("1.2.3.4")
    error = _limited(limiter, "1.2.3.4")
    retry = error.extra["retry_after"]
    assert isinstance(retry, int)
    assert retry >= 1
    assert error.params["retry_after"] == retry
    assert str(retry) in error.message("en")


def test_refused_attempts_do_not_extend_the_block(clock: FakeTime) -> None:
    """Hammering while blocked must not keep the caller blocked forever."""
    limiter = RateLimiter(limit=2, window_s=0.2)
    limiter.check("k")
    limiter.check("k")
    for _ in range(20):
        _limited(limiter, "k")
    clock.now += 0.25
    limiter.check("k")
    limiter.check("k")
    _limited(limiter, "k")


def test_window_slides_hit_by_hit(clock: FakeTime) -> None:
    """Hits leave the window one by one, not all at once at a fixed boundary."""
    limiter = RateLimiter(limit=2, window_s=0.4)
    limiter.check("k")  # t=0
    clock.now += 0.2
    limiter.check("k")  # t=0.2
    _limited(limiter, "k")
    clock.now += 0.3  # t=0.5: first hit gone, second (0.2) still inside until t=0.6
    limiter.check("k")
    _limited(limiter, "k")


def test_window_slides_deterministically(clock: FakeTime) -> None:
    limiter = RateLimiter(limit=3, window_s=10)
    for offset in (0.0, 4.0, 8.0):
        clock.now = 1000.0 + offset
        limiter.check("k")
    clock.now = 1009.9
    _limited(limiter, "k")
    clock.now = 1010.0  # the hit at 1000 is exactly one window old: gone
    limiter.check("k")
    _limited(limiter, "k")
    clock.now = 1014.0  # the hit at 1004 leaves
    limiter.check("k")
    _limited(limiter, "k")


def test_retry_after_is_honest(clock: FakeTime) -> None:
    """Waiting exactly `retry_after` seconds must be enough, and not much more than needed."""
    limiter = RateLimiter(limit=2, window_s=60)
    limiter.check("k")
    clock.now += 20.5
    limiter.check("k")
    error = _limited(limiter, "k")
    retry = error.extra["retry_after"]
    needed = 60 - 20.5
    assert needed <= retry <= needed + 1.5
    clock.now += retry
    limiter.check("k")


def test_keys_are_independent() -> None:
    limiter = RateLimiter(limit=1, window_s=5)
    limiter.check("a")
    _limited(limiter, "a")
    limiter.check("b")
    limiter.check("c")
    _limited(limiter, "b")


def test_stale_keys_evicted_when_full(clock: FakeTime) -> None:
    """Memory stays bounded by max_keys, and eviction only drops keys with no live hits."""
    limiter = RateLimiter(limit=1, window_s=10, max_keys=3)
    limiter.check("old1")
    limiter.check("old2")
    clock.now += 5
    limiter.check("live")
    clock.now += 6  # old1/old2 are now outside the window, "live" is not
    limiter.check("new")
    assert len(limiter._hits) <= 3
    _limited(limiter, "live")


def test_limiter_is_thread_safe() -> None:
    limiter = RateLimiter(limit=50, window_s=30)
    allowed: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(40):
            try:
                limiter.check("shared")
            except KamengError:
                continue
            with lock:
                allowed.append(1)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(allowed) == 50


def test_zero_limit_refuses_cleanly() -> None:
    """lookup_rate_per_minute=0 is a plausible setting ('off'); it must not cause a 500."""
    try:
        limiter = RateLimiter(limit=0, window_s=60)
    except ValueError:
        return
    _limited(limiter, "k")


# == stock line parsing =========================================================================


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("ABCD-1234", ("ABCD-1234", None)),
        ("ABCD-1234\n", ("ABCD-1234", None)),
        ("ABCD-1234\r\n", ("ABCD-1234", None)),
        ("  ABCD-1234\t", ("ABCD-1234", None)),
        ("CARD,PIN", ("CARD", "PIN")),
        ("CARD , PIN\r\n", ("CARD", "PIN")),
        ("\ufeffCARD,PIN", ("CARD", "PIN")),
        ("\ufeffABCD", ("ABCD", None)),
        ("卡号001,密码", ("卡号001", "密码")),
        ("a" * MAX_KEY_LENGTH, ("a" * MAX_KEY_LENGTH, None)),
        (f"{'a' * MAX_KEY_LENGTH},{'b' * MAX_KEY_LENGTH}", ("a" * 512, "b" * 512)),
        ("x=y;z", ("x=y;z", None)),
    ],
)
def test_parse_line_accepts(line: str, expected: tuple[str, str | None]) -> None:
    assert parse_line(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        "",
        "   ",
        "\n",
        "\ufeff",
        "AB CD",  # inner whitespace: two keys pasted on one line?
        "AB\tCD",
        "AB\u3000CD",  # ideographic space
        "AB\x00CD",
        "AB\x1fCD",  # our own code/secret separator must never come from a file
        "AB\x7fCD",
        "AB\u200bCD",  # zero-width space: invisible, would make an undeliverable key
        "a,b,c",
        "CARD,",
        ",PIN",
        ",",
        "CARD, ",
        "CARD,P IN",
        "a" * (MAX_KEY_LENGTH + 1),
        f"CARD,{'b' * (MAX_KEY_LENGTH + 1)}",
        f"{'a' * (MAX_KEY_LENGTH + 1)},PIN",
    ],
)
def test_parse_line_refuses(line: str) -> None:
    assert parse_line(line) is None


@settings(max_examples=300)
@given(st.text(max_size=80))
def test_parse_line_result_is_always_clean(line: str) -> None:
    """Whatever a file holds, a parsed key is printable, unspaced, bounded and comma-free."""
    parsed = parse_line(line)
    if parsed is None:
        return
    code, secret = parsed
    for part in (code, secret or "x"):
        assert part
        assert len(part) <= MAX_KEY_LENGTH
        assert all(ch.isprintable() and not ch.isspace() for ch in part)
        assert "\ufeff" not in part
    assert "," not in code
    assert secret is None or "," not in secret


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("", True),
        ("   \n", True),
        ("\r\n", True),
        ("# exported 2026-11-26", True),
        ("   #indented comment", True),
        ("#", True),
        ("ABCD", False),
        ("A#B", False),
        ("CARD,#PIN", False),
    ],
)
def test_is_blank_or_comment(line: str, expected: bool) -> None:
    assert is_blank_or_comment(line) is expected


@pytest.mark.parametrize(
    "line", ["\ufeff# keys exported from supplier", "\ufeff#batch-7", "\ufeff"]
)
def test_bom_before_comment_or_blank_is_skipped(line: str) -> None:
    """import_file decodes as plain utf-8; the first line of an Excel export starts with a BOM.

    '\\ufeff#batch-7' is currently imported as the card key '#batch-7'.
    """
    assert is_blank_or_comment(line)


# == tier prices ================================================================================


def _row(
    fixed: int | None = None, percent: int | None = None, allow_below: bool = False
) -> TierPrice:
    return TierPrice(fixed_cents=fixed, percent_bp=percent, allow_below_cost=allow_below)


def _price(row: TierPrice | None, **kwargs: Any) -> int:
    args: dict[str, Any] = {"base_cents": 10000, "cost_cents": 8000, "default_bp": 9500}
    args.update(kwargs)
    return compute_price(row=row, **args)


def test_tier_default_applies_without_row() -> None:
    assert _price(None) == 9500
    assert _price(None, default_bp=10000) == 10000
    assert _price(_row()) == 9500  # a row with neither fixed nor percent


def test_fixed_price_wins() -> None:
    assert _price(_row(fixed=8800)) == 8800
    assert _price(_row(fixed=12000)) == 12000


def test_fixed_wins_over_percent_when_both_set() -> None:
    assert _price(_row(fixed=9000, percent=9900)) == 9000


def test_percent_of_base_price_rounded_half_up() -> None:
    assert _price(_row(percent=9000)) == 9000
    assert _price(_row(percent=9750), base_cents=199, cost_cents=0) == 194  # 194.025
    assert _price(_row(percent=5000), base_cents=5, cost_cents=0) == 3  # 2.5 -> 3


@pytest.mark.parametrize(
    "row",
    [None, _row(fixed=100), _row(percent=1000)],
    ids=["tier-default", "fixed", "percent"],
)
def test_clamped_to_cost_unless_allowed(row: TierPrice | None) -> None:
    """A cost that rises later must never turn every sale into a loss."""
    assert _price(row, default_bp=1000) == 8000
    assert _price(row, default_bp=1000, sku_allows_below_cost=True) < 8000


def test_row_can_allow_below_cost() -> None:
    assert _price(_row(fixed=100, allow_below=True)) == 100
    assert _price(_row(percent=1000, allow_below=True)) == 1000


def test_row_allowance_does_not_leak_into_tier_default() -> None:
    """allow_below_cost on a row without a price of its own must not unclamp the default."""
    assert _price(_row(allow_below=True), default_bp=1000) == 8000


def test_price_equal_to_cost_is_not_changed() -> None:
    assert _price(_row(fixed=8000)) == 8000


@settings(max_examples=300)
@given(
    base=st.integers(min_value=0, max_value=10**9),
    cost=st.integers(min_value=0, max_value=10**9),
    default_bp=st.integers(min_value=1, max_value=100000),
    fixed=st.one_of(st.none(), st.integers(min_value=0, max_value=10**9)),
    percent=st.one_of(st.none(), st.integers(min_value=1, max_value=100000)),
    row_allows=st.booleans(),
    sku_allows=st.booleans(),
)
def test_never_below_cost_without_permission(
    base: int,
    cost: int,
    default_bp: int,
    fixed: int | None,
    percent: int | None,
    row_allows: bool,
    sku_allows: bool,
) -> None:
    row = _row(fixed, percent, row_allows)
    price = compute_price(
        base_cents=base,
        cost_cents=cost,
        default_bp=default_bp,
        row=row,
        sku_allows_below_cost=sku_allows,
    )
    has_own_price = fixed is not None or percent is not None
    if price < cost:
        assert sku_allows or (row_allows and has_own_price)
    if not sku_allows and not (row_allows and has_own_price):
        assert price >= cost
    assert price >= 0
