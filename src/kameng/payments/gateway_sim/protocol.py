"""The EPay wire format as the simulated gateway speaks it: validating a `submit.php` request,
the signed parameters of a notify (and of the return redirect), and URL plumbing.

Kept apart from the HTTP handlers so the rules a merchant's request must meet read as one list,
in the order a real gateway applies them: who is asking, is it really them, then the fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from kameng.payments.gateway_sim.state import PAY_TYPES, Merchant, NewTrade, Trade
from kameng.security import epay

MAX_OUT_TRADE_NO = 64
MAX_NAME = 127
MAX_URL = 1024


class SubmitError(Exception):
    """A refused submit: shown to the buyer as an error page, in Chinese and English."""

    def __init__(self, zh: str, en: str, status: int = 400) -> None:
        super().__init__(f"{zh} / {en}")
        self.zh = zh
        self.en = en
        self.status = status


def is_http_url(url: str) -> bool:
    if len(url) > MAX_URL or any(c.isspace() or ord(c) < 32 for c in url):
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def without_query(url: str) -> str:
    """The URL as logged: no query (a notify's query carries the signature) and no fragment."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def with_query(url: str, params: Mapping[str, str]) -> str:
    """`url` with `params` added to whatever query it already has; on a name clash ours win,
    as they do for PHP gateways that append `&k=v` (the later value wins in `$_GET`)."""
    parts = urlsplit(url)
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in params]
    query = urlencode([*kept, *params.items()])
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def notify_params(trade: Trade, key: str) -> dict[str, str]:
    """The signed parameters of the notify and of the return redirect.

    `currency` is echoed only when the merchant sent one, and `param` only when it is not empty,
    so a merchant that uses neither sees exactly the classic EPay field set.
    """
    params = {
        "pid": trade.pid,
        "trade_no": trade.trade_no,
        "out_trade_no": trade.out_trade_no,
        "type": trade.type,
        "name": trade.name,
        "money": epay.format_money(trade.money_cents),
        "trade_status": "TRADE_SUCCESS",
    }
    if trade.param:
        params["param"] = trade.param
    if trade.currency is not None:
        params["currency"] = trade.currency
    return epay.signed(params, key)


def parse_amount(text: object) -> int | None:
    """Yuan text ("12.34") to cents, None if it is not a plain amount. ASCII only:
    `epay.parse_money` relies on str.isdigit, which also accepts "²" (then int() raises) and
    other scripts' digits ("１２" would read as 12 yuan)."""
    if not isinstance(text, str) or not text.isascii():
        return None
    return epay.parse_money(text)


def corrupt_sign(params: dict[str, str], key: str) -> dict[str, str]:
    """The same parameters with a well-formed sign made with the wrong key (the `bad_sign`
    fault): it has the right shape, so only a receiver that really verifies will notice."""
    bad = dict(params)
    bad["sign"] = epay.sign(params, key + "#not-the-key")
    return bad


def parse_submit(params: Mapping[str, str], merchants: Mapping[str, Merchant]) -> NewTrade:
    """Check a `submit.php` request and return what it asks for (SubmitError otherwise)."""
    pid = params.get("pid", "")
    if not pid:
        raise SubmitError("缺少商户ID", "pid is required")
    merchant = merchants.get(pid)
    if merchant is None:
        raise SubmitError("商户不存在", f"unknown merchant pid {pid}")
    if (params.get("sign_type") or "MD5").upper() != "MD5":
        raise SubmitError("签名类型不支持", "sign_type must be MD5")
    if not params.get("sign"):
        raise SubmitError("缺少签名", "sign is required")
    if not epay.verify(params, merchant.key):
        raise SubmitError("签名校验失败", "invalid signature")

    out_trade_no = params.get("out_trade_no", "")
    if not 1 <= len(out_trade_no) <= MAX_OUT_TRADE_NO or not out_trade_no.isprintable():
        raise SubmitError(
            "订单号格式错误", f"out_trade_no must be 1-{MAX_OUT_TRADE_NO} printable characters"
        )
    pay_type = params.get("type", "")
    if pay_type not in PAY_TYPES:
        raise SubmitError("支付方式不支持", f"type must be one of {', '.join(PAY_TYPES)}")
    money = parse_amount(params.get("money", ""))
    if money is None or money <= 0:
        raise SubmitError("金额不合法", "money must be a positive amount like 12.34")
    name = params.get("name", "")  # echoed exactly as signed, spaces and all
    if not name.strip() or len(name) > MAX_NAME or not name.isprintable():
        raise SubmitError("商品名称不合法", f"name must be 1-{MAX_NAME} printable characters")
    notify_url = params.get("notify_url", "")
    if not is_http_url(notify_url):
        raise SubmitError("异步通知地址不合法", "notify_url must be an http(s) URL")
    return_url = params.get("return_url") or None
    if return_url is not None and not is_http_url(return_url):
        raise SubmitError("跳转地址不合法", "return_url must be an http(s) URL")
    currency = params.get("currency") or None
    if currency is not None and currency != merchant.currency:
        raise SubmitError(
            "币种不支持", f"currency must be this merchant's currency {merchant.currency}"
        )
    return NewTrade(
        pid=pid,
        out_trade_no=out_trade_no,
        type=pay_type,
        name=name,
        money_cents=money,
        notify_url=notify_url,
        return_url=return_url,
        sitename=params.get("sitename", "")[:MAX_NAME],
        param=params.get("param", "")[:MAX_URL],
        currency=currency,
    )
