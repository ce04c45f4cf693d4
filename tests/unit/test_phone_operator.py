"""Mainland mobile numbers: operator by segment, and 话费 fields that accept only their own
operator's numbers (caught on the form, before any money moves)."""

from __future__ import annotations

import pytest

from kameng.catalog.fields import validate_fields, validate_template
from kameng.catalog.phone_cn import CBN, CMCC, CTCC, CUCC, Operator, operator_of
from kameng.errors import KamengError


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        ("13800138000", Operator(CMCC, False)),
        ("13412345678", Operator(CMCC, False)),
        ("13492345678", Operator(CTCC, False)),  # 1349: satellite, China Telecom
        ("19812345678", Operator(CMCC, False)),
        ("13012345678", Operator(CUCC, False)),
        ("18612345678", Operator(CUCC, False)),
        ("13312345678", Operator(CTCC, False)),
        ("19912345678", Operator(CTCC, False)),
        ("19212345678", Operator(CBN, False)),
        ("17031234567", Operator(CMCC, True)),
        ("17091234567", Operator(CUCC, True)),
        ("17001234567", Operator(CTCC, True)),
        ("16212345678", Operator(CTCC, True)),
        ("16512345678", Operator(CMCC, True)),
        ("16712345678", Operator(CUCC, True)),
        ("17112345678", Operator(CUCC, True)),
    ],
)
def test_operator_by_segment(number: str, expected: Operator) -> None:
    assert operator_of(number) == expected


@pytest.mark.parametrize(
    "number", ["11012345678", "1380013800", "138001380000", "１３８00138000", "14112345678"]
)
def test_unknown_or_malformed_numbers_have_no_operator(number: str) -> None:
    assert operator_of(number) is None


TEMPLATE = validate_template(
    [
        {
            "name": "phone",
            "type": "phone_cn",
            "label": "手机号",
            "label_en": "Mobile",
            "operator": "cmcc",
        }
    ]
)


def test_a_number_of_the_products_operator_is_accepted() -> None:
    assert validate_fields(TEMPLATE, {"phone": "138 0013 8000"}) == {"phone": "13800138000"}


@pytest.mark.parametrize(
    ("number", "code", "zh"),
    [
        ("13012345678", "operator_mismatch", "该号码属于中国联通，本商品仅支持中国移动号码"),
        (
            "17031234567",
            "operator_mismatch",
            "该号码属于中国移动虚拟运营商，本商品仅支持中国移动号码",
        ),
        ("14112345678", "operator_unknown", "手机号的号段无法识别，本商品仅支持中国移动号码"),
    ],
)
def test_another_operators_number_is_refused_before_payment(
    number: str, code: str, zh: str
) -> None:
    with pytest.raises(KamengError) as refused:
        validate_fields(TEMPLATE, {"phone": number})
    problem = refused.value.extra["fields"][0]
    assert (problem["field"], problem["code"], problem["message_zh"]) == ("phone", code, zh)
    assert "China Mobile" in problem["message_en"]


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "phone", "type": "phone_cn", "operator": "vodafone"},
        {"name": "qq", "type": "qq", "operator": "cmcc"},
    ],
)
def test_operator_rules_are_checked_when_the_template_is_saved(spec: dict[str, str]) -> None:
    with pytest.raises(KamengError) as refused:
        validate_template([spec])
    assert refused.value.code == "invalid_field_template"
