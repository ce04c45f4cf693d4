"""Region/server lists that depend on each other, and denominations, in buyer-field templates."""

from __future__ import annotations

from typing import Any

import pytest

from kameng.catalog.fields import validate_fields, validate_template
from kameng.errors import ErrorCode, KamengError

GAME = [
    {
        "name": "region",
        "type": "select",
        "label": "大区",
        "label_en": "Region",
        "options": ["华东", "华南"],
    },
    {
        "name": "server",
        "type": "select",
        "label": "服务器",
        "label_en": "Server",
        "options_by": {"field": "region", "options": {"华东": ["东1", "东2"], "华南": ["南1"]}},
    },
    {"name": "uid", "type": "text", "label": "角色ID", "label_en": "Role id", "role": "account"},
    {
        "name": "amount",
        "type": "number",
        "label": "面值",
        "label_en": "Amount",
        "values": [10, 50, 100],
    },
]


def problems(template: list[dict[str, Any]], given: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(KamengError) as caught:
        validate_fields(template, given)
    assert caught.value.code is ErrorCode.invalid_fields
    return {p["field"]: p["code"] for p in caught.value.extra["fields"]}


def test_a_server_of_the_chosen_region_passes() -> None:
    template = validate_template(GAME)
    assert template[1]["options"] == ["东1", "东2", "南1"]
    clean = validate_fields(
        template, {"region": "华东", "server": "东2", "uid": "abc", "amount": "５０"}
    )
    assert clean == {"region": "华东", "server": "东2", "uid": "abc", "amount": "50"}


def test_a_server_of_another_region_is_refused_with_the_right_choices() -> None:
    template = validate_template(GAME)
    with pytest.raises(KamengError) as caught:
        validate_fields(template, {"region": "华南", "server": "东1", "uid": "a", "amount": 10})
    (problem,) = caught.value.extra["fields"]
    assert problem["field"] == "server" and problem["code"] == "not_for_parent"
    assert "南1" in problem["message_zh"] and "南1" in problem["message_en"]
    assert "东1" not in problem["message_en"].split("choose one of:")[1]


def test_an_unknown_server_and_a_closed_denomination_are_both_reported() -> None:
    template = validate_template(GAME)
    found = problems(template, {"region": "华东", "server": "西1", "uid": "a", "amount": 20})
    assert found == {"server": "not_in_options", "amount": "denomination_unavailable"}


@pytest.mark.parametrize(
    "bad",
    [
        {"options_by": {"field": "nowhere", "options": {"华东": ["东1"]}}},
        {"options_by": {"field": "region", "options": {"西北": ["西1"]}}},  # not a region
        {"options_by": {"field": "region", "options": {"华东": []}}},
        {"options_by": {"field": "region", "options": {"华东": [1]}}},
        {"options_by": "region"},
    ],
)
def test_bad_dependent_lists_are_refused(bad: dict[str, Any]) -> None:
    spec = {"name": "server", "type": "select", **bad}
    with pytest.raises(KamengError) as caught:
        validate_template([GAME[0], spec])
    assert caught.value.code is ErrorCode.invalid_field_template


def test_a_parent_must_come_first_and_be_a_select() -> None:
    server = GAME[1]
    with pytest.raises(KamengError):
        validate_template([server, GAME[0]])
    text_region = {"name": "region", "type": "text"}
    with pytest.raises(KamengError):
        validate_template([text_region, server])


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "amount", "type": "number", "values": []},
        {"name": "amount", "type": "number", "values": ["10"]},
        {"name": "amount", "type": "number", "values": [True]},
        {"name": "amount", "type": "text", "values": [10]},
        {"name": "uid", "type": "text", "role": "owner"},
    ],
)
def test_bad_denominations_and_roles_are_refused(spec: dict[str, Any]) -> None:
    with pytest.raises(KamengError) as caught:
        validate_template([spec])
    assert caught.value.code is ErrorCode.invalid_field_template
