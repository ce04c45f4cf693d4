"""Buyer-field templates and validation (`catalog/fields.py`).

Bad buyer input must come back as one `invalid_fields` error listing every problem with a stable
code and both languages; bad staff templates as `invalid_field_template`, never as a crash.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kameng.catalog.fields import FIELD_TYPES, MAX_FIELD_LEN, validate_fields, validate_template
from kameng.errors import ErrorCode, KamengError

# -- helpers ------------------------------------------------------------------------------------


def _template_error(template: Any) -> KamengError:
    with pytest.raises(KamengError) as info:
        validate_template(template)
    assert info.value.code is ErrorCode.invalid_field_template
    assert info.value.http_status == 422
    return info.value


def _field_problems(template: list[dict[str, Any]], given: Any) -> list[dict[str, str]]:
    with pytest.raises(KamengError) as info:
        validate_fields(template, given)
    assert info.value.code is ErrorCode.invalid_fields
    problems = info.value.extra["fields"]
    assert isinstance(problems, list)
    assert problems, "invalid_fields must list at least one problem"
    for problem in problems:
        assert set(problem) == {"field", "code", "message_zh", "message_en"}
        assert problem["message_zh"]
        assert problem["message_en"]
    return problems


def _codes(problems: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [(p["field"], p["code"]) for p in problems]


def _one(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return validate_template([{"name": "f", **spec}])


# -- validate_template --------------------------------------------------------------------------


def test_template_normalised_with_defaults() -> None:
    """Missing type/label/required get explicit defaults so later code need not guess."""
    out = validate_template([{"name": "account"}])
    assert out == [
        {
            "name": "account",
            "type": "text",
            "label": "account",
            "label_en": "account",
            "required": True,
        }
    ]


def test_template_keeps_every_option() -> None:
    out = validate_template(
        [
            {
                "name": "server",
                "type": "select",
                "label": "区服",
                "label_en": "Server",
                "required": False,
                "options": ["电信一区", "网通一区"],
            },
            {"name": "code", "pattern": r"[A-Z]{3}\d+", "min_length": 4, "max_length": "8"},
        ]
    )
    assert out[0] == {
        "name": "server",
        "type": "select",
        "label": "区服",
        "label_en": "Server",
        "required": False,
        "options": ["电信一区", "网通一区"],
    }
    assert out[1]["pattern"] == r"[A-Z]{3}\d+"
    assert out[1]["min_length"] == 4
    assert out[1]["max_length"] == 8
    assert out[1]["label_en"] == "code"


def test_label_en_falls_back_to_label() -> None:
    assert validate_template([{"name": "qq", "label": "QQ号"}])[0]["label_en"] == "QQ号"


def test_empty_template_is_valid() -> None:
    assert validate_template([]) == []


@pytest.mark.parametrize("ftype", sorted(FIELD_TYPES - {"select"}))
def test_every_field_type_accepted(ftype: str) -> None:
    assert validate_template([{"name": "f", "type": ftype}])[0]["type"] == ftype


@pytest.mark.parametrize(
    "template",
    [
        None,
        "[]",
        {"name": "a"},
        42,
        ["a"],
        [None],
        [[("name", "a")]],
    ],
    ids=["none", "string", "dict", "int", "list-of-str", "list-of-none", "list-of-list"],
)
def test_template_shape_refused(template: Any) -> None:
    _template_error(template)


@pytest.mark.parametrize(
    "name",
    [
        None,
        "",
        "A",
        "Account",
        "1abc",
        "_a",
        "a-b",
        "a b",
        "a.b",
        "账号",
        "a" * 33,
        "a\n",
        7,
        ["a"],
    ],
)
def test_bad_field_names_refused(name: Any) -> None:
    """Names become JSON keys and form ids: lower-case identifiers of at most 32 chars only."""
    _template_error([{"name": name}])


@pytest.mark.parametrize("name", ["a", "a" * 32, "phone_2", "x_y_z"])
def test_good_field_names_accepted(name: str) -> None:
    assert validate_template([{"name": name}])[0]["name"] == name


def test_missing_name_refused() -> None:
    _template_error([{"type": "text"}])


def test_duplicate_names_refused() -> None:
    error = _template_error([{"name": "phone"}, {"name": "qq"}, {"name": "phone"}])
    assert "phone" in str(error.params.get("detail"))


@pytest.mark.parametrize("ftype", ["TEXT", "string", "int", "", "phone", None, 3])
def test_unknown_types_refused(ftype: Any) -> None:
    _template_error([{"name": "f", "type": ftype}])


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "s", "type": "select"},
        {"name": "s", "type": "select", "options": []},
        {"name": "s", "type": "select", "options": "a,b"},
        {"name": "s", "type": "select", "options": ["a", 2]},
        {"name": "s", "type": "select", "options": [None]},
        {"name": "s", "type": "select", "options": {"a": 1}},
    ],
    ids=["missing", "empty", "string", "mixed", "none-item", "dict"],
)
def test_select_without_proper_options_refused(spec: dict[str, Any]) -> None:
    _template_error([spec])


@pytest.mark.parametrize("pattern", ["(", "[a-", "*a", "a{2,1}", "(?P<x>a)(?P<x>b)"])
def test_bad_regex_refused(pattern: str) -> None:
    error = _template_error([{"name": "f", "pattern": pattern}])
    assert "pattern" in str(error.params.get("detail"))


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(
            {"name": "f", "pattern": 123},
            id="pattern-int",
        ),
        pytest.param(
            {"name": "f", "min_length": "x"},
            id="min-length-text",
        ),
        pytest.param(
            {"name": "f", "max_length": None},
            id="max-length-none",
        ),
        pytest.param(
            {"name": "f", "type": ["text"]},
            id="type-list",
        ),
    ],
)
def test_malformed_template_values_refused_not_crashing(spec: dict[str, Any]) -> None:
    """Staff input of the wrong JSON type must be a 422 invalid_field_template, not a 500."""
    _template_error([spec])


# -- validate_fields: basics --------------------------------------------------------------------


TEXT = validate_template([{"name": "account", "label": "账号", "label_en": "Account"}])


def test_valid_text_is_trimmed() -> None:
    assert validate_fields(TEXT, {"account": "  player01 \t"}) == {"account": "player01"}


@pytest.mark.parametrize("given", [{}, None, {"account": ""}, {"account": "   "}])
def test_required_field_missing(given: Any) -> None:
    problems = _field_problems(TEXT, given)
    assert _codes(problems) == [("account", "required")]
    assert problems[0]["message_zh"] == "请填写账号"
    assert problems[0]["message_en"] == "Account is required"


def test_optional_field_may_be_absent_or_blank() -> None:
    template = validate_template([{"name": "note", "required": False}])
    assert validate_fields(template, {}) == {}
    assert validate_fields(template, {"note": None}) == {}
    assert validate_fields(template, {"note": "  "}) == {}
    assert validate_fields(template, {"note": " hi "}) == {"note": "hi"}


def test_optional_field_still_validated_when_given() -> None:
    template = validate_template([{"name": "qq", "type": "qq", "required": False}])
    assert _codes(_field_problems(template, {"qq": "abc"})) == [("qq", "format")]


def test_unknown_field_refused() -> None:
    """An unknown field usually means a typo in a reseller's integration: say so, do not drop."""
    problems = _field_problems(TEXT, {"account": "x", "acount": "y"})
    assert _codes(problems) == [("acount", "unknown")]
    assert "acount" in problems[0]["message_en"]


def test_empty_template_refuses_any_field_and_accepts_none() -> None:
    assert validate_fields([], {}) == {}
    assert validate_fields([], None) == {}
    assert _codes(_field_problems([], {"x": "1"})) == [("x", "unknown")]


@pytest.mark.parametrize("given", [[], "account=x", 5, ["account", "x"], ("a",)])
def test_non_dict_input_refused(given: Any) -> None:
    problems = _field_problems(TEXT, given)
    assert _codes(problems) == [("fields", "type")]


@pytest.mark.parametrize("raw", [True, ["x"], {"a": 1}, b"bytes"])
def test_non_text_value_refused(raw: Any) -> None:
    assert _codes(_field_problems(TEXT, {"account": raw})) == [("account", "type")]


@pytest.mark.parametrize(("raw", "expected"), [(12345, "12345"), (0, "0"), (1.5, "1.5")])
def test_numbers_accepted_as_text(raw: float, expected: str) -> None:
    """JSON clients often send a QQ number or an account id as a number."""
    assert validate_fields(TEXT, {"account": raw}) == {"account": expected}


def test_integer_qq_accepted() -> None:
    template = validate_template([{"name": "qq", "type": "qq"}])
    assert validate_fields(template, {"qq": 10001}) == {"qq": "10001"}


def test_value_over_global_limit_refused() -> None:
    assert validate_fields(TEXT, {"account": "a" * MAX_FIELD_LEN})["account"] == "a" * 256
    problems = _field_problems(TEXT, {"account": "a" * (MAX_FIELD_LEN + 1)})
    assert _codes(problems) == [("account", "too_long")]


# -- phone_cn -----------------------------------------------------------------------------------

PHONE = validate_template([{"name": "phone", "type": "phone_cn", "label": "手机号"}])


@pytest.mark.parametrize(
    "raw",
    [
        "13800138000",
        " 13800138000 ",
        "+86 138-0013-8000",
        "+8613800138000",
        "138 0013 8000",
        "138-0013-8000",
        13800138000,
    ],
)
def test_phone_normalised(raw: Any) -> None:
    """Separators and +86 are removed so the duplicate-order guard compares like with like."""
    assert validate_fields(PHONE, {"phone": raw}) == {"phone": "13800138000"}


@pytest.mark.parametrize("second", list("3456789"))
def test_every_mobile_prefix_accepted(second: str) -> None:
    number = f"1{second}012345678"
    assert validate_fields(PHONE, {"phone": number}) == {"phone": number}


@pytest.mark.parametrize(
    "raw",
    [
        "12012345678",  # 12x is not a mobile prefix
        "11012345678",
        "10012345678",
        "23800138000",
        "1380013800",  # 10 digits
        "138001380001",  # 12 digits
        "8613800138000",  # country code without the plus
        "+8513800138000",
        "1380013800a",
        "phone",
        "+86",
        "+1 415 555 0100",
        "138_0013_8000",
        "(138)00138000",
    ],
)
def test_invalid_phones_refused(raw: str) -> None:
    problems = _field_problems(PHONE, {"phone": raw})
    assert len(problems) == 1
    assert problems[0]["field"] == "phone"
    assert problems[0]["code"] in {"format", "required"}


def test_phone_format_error_message() -> None:
    problems = _field_problems(PHONE, {"phone": "12012345678"})
    assert _codes(problems) == [("phone", "format")]
    assert problems[0]["message_zh"].startswith("手机号")
    assert "mobile" in problems[0]["message_en"]


def test_fullwidth_digits_in_phone_refused_or_normalised() -> None:
    """Full-width digits must not be stored as is: suppliers and the duplicate guard need ASCII."""
    raw = "13８００１３８０００"
    try:
        clean = validate_fields(PHONE, {"phone": raw})
    except KamengError as exc:
        assert exc.code is ErrorCode.invalid_fields
    else:
        assert clean == {"phone": "13800138000"}


# -- qq, email, number --------------------------------------------------------------------------

QQ = validate_template([{"name": "qq", "type": "qq"}])
EMAIL = validate_template([{"name": "email", "type": "email"}])
NUMBER = validate_template([{"name": "n", "type": "number"}])


@pytest.mark.parametrize("raw", ["10001", "123456789012", " 987654321 "])
def test_valid_qq(raw: str) -> None:
    assert validate_fields(QQ, {"qq": raw}) == {"qq": raw.strip()}


@pytest.mark.parametrize("raw", ["1234", "1234567890123", "012345", "12345a", "12 345", "-12345"])
def test_invalid_qq(raw: str) -> None:
    assert _codes(_field_problems(QQ, {"qq": raw})) == [("qq", "format")]


@pytest.mark.parametrize("raw", ["a@b.co", "first.last+tag@mail.example.com", "用户@例子.com"])
def test_valid_email(raw: str) -> None:
    assert validate_fields(EMAIL, {"email": raw}) == {"email": raw}


@pytest.mark.parametrize(
    "raw",
    ["plain", "a@b", "@b.com", "a@.c", "a b@c.com", "a@b.c", "a@@b.com", "a@b.c0m", "a@b .com"],
)
def test_invalid_email(raw: str) -> None:
    assert _codes(_field_problems(EMAIL, {"email": raw})) == [("email", "format")]


@pytest.mark.parametrize("raw", ["0", "42", "-3", "1.50", 7, -2.25])
def test_valid_number(raw: Any) -> None:
    assert validate_fields(NUMBER, {"n": raw}) == {"n": str(raw).strip()}


@pytest.mark.parametrize("raw", ["abc", "1e5", ".5", "5.", "1,000", "--1", "+1", "NaN", "1 2"])
def test_invalid_number(raw: str) -> None:
    assert _codes(_field_problems(NUMBER, {"n": raw})) == [("n", "format")]


# -- select, lengths, pattern -------------------------------------------------------------------

SELECT = validate_template(
    [{"name": "server", "type": "select", "label": "区服", "options": ["一区", "二区"]}]
)


def test_select_accepts_listed_option() -> None:
    assert validate_fields(SELECT, {"server": " 二区 "}) == {"server": "二区"}


@pytest.mark.parametrize("raw", ["三区", "一", "一区二区", "1"])
def test_select_refuses_other_values(raw: str) -> None:
    problems = _field_problems(SELECT, {"server": raw})
    assert _codes(problems) == [("server", "not_in_options")]
    assert "一区" in problems[0]["message_zh"]
    assert "二区" in problems[0]["message_en"]


LENGTHS = _one({"min_length": 3, "max_length": 5})


@pytest.mark.parametrize("raw", ["abc", "abcd", "abcde", "  abc  "])
def test_lengths_within_bounds(raw: str) -> None:
    assert validate_fields(LENGTHS, {"f": raw}) == {"f": raw.strip()}


def test_too_short_and_too_long() -> None:
    assert _codes(_field_problems(LENGTHS, {"f": "ab"})) == [("f", "too_short")]
    assert _codes(_field_problems(LENGTHS, {"f": "abcdef"})) == [("f", "too_long")]


def test_lengths_count_characters_not_bytes() -> None:
    """Chinese account names must not be measured in UTF-8 bytes."""
    assert validate_fields(LENGTHS, {"f": "玩家名字"}) == {"f": "玩家名字"}


PATTERN = _one({"pattern": r"[A-Z]{2}\d{3}"})


def test_pattern_full_match_required() -> None:
    """A pattern must match the whole value, not just a prefix or an inner part."""
    assert validate_fields(PATTERN, {"f": "AB123"}) == {"f": "AB123"}
    for raw in ["AB1234", "xAB123", "AB12", "ab123", "AB123\nX"]:
        assert _codes(_field_problems(PATTERN, {"f": raw})) == [("f", "format")]


def test_pattern_with_alternation_is_anchored_as_a_whole() -> None:
    template = _one({"pattern": r"a|bc"})
    assert validate_fields(template, {"f": "a"}) == {"f": "a"}
    assert validate_fields(template, {"f": "bc"}) == {"f": "bc"}
    assert _codes(_field_problems(template, {"f": "abc"})) == [("f", "format")]


# -- all problems at once -----------------------------------------------------------------------

FORM = validate_template(
    [
        {"name": "account", "label": "账号", "label_en": "Account"},
        {"name": "phone", "type": "phone_cn", "label": "手机号", "label_en": "Phone"},
        {"name": "qq", "type": "qq", "label": "QQ", "required": False},
        {"name": "server", "type": "select", "label": "区服", "options": ["一区"]},
        {"name": "email", "type": "email", "label": "邮箱", "label_en": "Email"},
    ]
)


def test_every_problem_is_listed_at_once_with_stable_codes() -> None:
    """The buyer fixes the whole form in one go; resellers branch on (field, code)."""
    problems = _field_problems(
        FORM,
        {"phone": "12345", "qq": "x", "server": "九区", "email": "nope", "extra": "1", "z": 2},
    )
    assert _codes(problems) == [
        ("extra", "unknown"),
        ("z", "unknown"),
        ("account", "required"),
        ("phone", "format"),
        ("qq", "format"),
        ("server", "not_in_options"),
        ("email", "format"),
    ]
    by_field = {p["field"]: p for p in problems}
    assert by_field["account"]["message_en"] == "Account is required"
    assert by_field["phone"]["message_zh"].startswith("手机号")
    assert by_field["email"]["message_en"].startswith("Email")


def test_valid_form_returns_only_clean_values() -> None:
    clean = validate_fields(
        FORM,
        {
            "account": " p1 ",
            "phone": "+86 138 0013 8000",
            "server": "一区",
            "email": "a@b.cn",
        },
    )
    assert clean == {
        "account": "p1",
        "phone": "13800138000",
        "server": "一区",
        "email": "a@b.cn",
    }


def test_error_localises_field_messages() -> None:
    with pytest.raises(KamengError) as info:
        validate_fields(FORM, {"account": "x", "phone": "1", "server": "一区", "email": "a@b.cn"})
    zh = info.value.to_dict("zh-CN")["error"]
    en = info.value.to_dict("en")["error"]
    assert zh["code"] == en["code"] == "invalid_fields"
    assert zh["fields"] == [
        {"field": "phone", "code": "format", "message": zh["fields"][0]["message"]}
    ]
    assert "手机号" in zh["fields"][0]["message"]
    assert "Phone" in en["fields"][0]["message"]
    # the raw bilingual problem list stays untouched for other consumers
    assert "message_zh" in info.value.extra["fields"][0]


def test_validation_does_not_mutate_inputs() -> None:
    given = {"account": " p1 ", "phone": "138-0013-8000", "server": "一区", "email": "a@b.cn"}
    snapshot = dict(given)
    template_snapshot = [dict(s) for s in FORM]
    validate_fields(FORM, given)
    assert given == snapshot
    assert template_snapshot == FORM


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.one_of(st.text(max_size=20), st.integers())))
def test_arbitrary_input_never_crashes(given: dict[str, Any]) -> None:
    """Whatever a client sends, the answer is clean values or invalid_fields, never a crash."""
    try:
        clean = validate_fields(FORM, given)
    except KamengError as exc:
        assert exc.code is ErrorCode.invalid_fields
        assert exc.extra["fields"]
    else:
        assert set(clean) <= {spec["name"] for spec in FORM}
        assert all(isinstance(v, str) and v == v.strip() for v in clean.values())
