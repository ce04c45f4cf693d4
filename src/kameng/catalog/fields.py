"""Buyer-field templates: what a product asks of the buyer, and field-level validation.

A template is a list of field specs stored on the product. Validation is pure and returns every
problem at once (so a buyer fixes the form in one go), each with a stable code and a message in
both languages. Values are normalised (trimmed, phone numbers without separators) before they
are stored, so the duplicate-order guard compares like with like.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from kameng.catalog import phone_cn
from kameng.errors import ErrorCode, KamengError, field_error

FIELD_TYPES = frozenset({"text", "select", "phone_cn", "qq", "email", "number"})
# ASCII digits only: `\d` would also accept other scripts' digits and store them as typed.
_PHONE_CN = re.compile(r"^1[3-9][0-9]{9}$")
_QQ = re.compile(r"^[1-9][0-9]{4,11}$")
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}\.[A-Za-z]{2,}$")
MAX_FIELD_LEN = 256


def validate_template(template: Any) -> list[dict[str, Any]]:
    """Check a template given by staff; returns it normalised or raises invalid_field_template."""
    if not isinstance(template, list):
        raise KamengError(ErrorCode.invalid_field_template, detail="must be a list")
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for i, spec in enumerate(template):
        if not isinstance(spec, dict):
            raise KamengError(ErrorCode.invalid_field_template, detail=f"#{i} is not an object")
        name = spec.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", name):
            raise KamengError(
                ErrorCode.invalid_field_template, detail=f"#{i}: name must match [a-z][a-z0-9_]*"
            )
        if name in seen:
            raise KamengError(ErrorCode.invalid_field_template, detail=f"duplicate field {name}")
        seen.add(name)
        ftype = spec.get("type", "text")
        if not isinstance(ftype, str) or ftype not in FIELD_TYPES:
            raise KamengError(
                ErrorCode.invalid_field_template,
                detail=f"{name}: type must be one of {sorted(FIELD_TYPES)}",
            )
        options = spec.get("options")
        options_by = spec.get("options_by")
        if options_by is not None:
            # Dependent lists: a game's servers depend on the region chosen before them.
            parent = options_by.get("field") if isinstance(options_by, dict) else None
            choices = options_by.get("options") if isinstance(options_by, dict) else None
            parent_spec = next((o for o in out if o["name"] == parent), None)
            if (
                ftype != "select"
                or parent_spec is None
                or parent_spec["type"] != "select"
                or not isinstance(choices, dict)
                or not choices
                or not all(
                    k in parent_spec["options"]
                    and isinstance(v, list)
                    and v
                    and all(isinstance(o, str) for o in v)
                    for k, v in choices.items()
                )
            ):
                raise KamengError(
                    ErrorCode.invalid_field_template,
                    detail=f"{name}: options_by is {{field: <an earlier select>, options: "
                    "{<its option>: [choices]}}",
                )
            options = sorted({o for v in choices.values() for o in v})
        if ftype == "select" and (
            not isinstance(options, list)
            or not options
            or not all(isinstance(o, str) for o in options)
        ):
            raise KamengError(
                ErrorCode.invalid_field_template, detail=f"{name}: select needs options"
            )
        operator = spec.get("operator")
        if operator is not None and (ftype != "phone_cn" or operator not in phone_cn.NAMES):
            raise KamengError(
                ErrorCode.invalid_field_template,
                detail=f"{name}: operator is for phone_cn fields: one of {sorted(phone_cn.NAMES)}",
            )
        values = spec.get("values")
        if values is not None and (
            ftype != "number"
            or not isinstance(values, list)
            or not values
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        ):
            raise KamengError(
                ErrorCode.invalid_field_template,
                detail=f"{name}: values (the denominations on offer) is a list of numbers "
                "for a number field",
            )
        role = spec.get("role")
        if role is not None and role != "account":
            raise KamengError(
                ErrorCode.invalid_field_template, detail=f"{name}: role can only be 'account'"
            )
        pattern = spec.get("pattern")
        if pattern is not None:
            if not isinstance(pattern, str):
                raise KamengError(
                    ErrorCode.invalid_field_template, detail=f"{name}: pattern must be text"
                )
            try:
                re.compile(pattern)
            except re.error as exc:
                raise KamengError(
                    ErrorCode.invalid_field_template, detail=f"{name}: bad pattern ({exc})"
                ) from None
        lengths = {}
        for bound in ("min_length", "max_length"):
            if bound in spec:
                value = spec[bound]
                if isinstance(value, str) and value.isascii() and value.isdigit():
                    value = int(value)  # "8" from a hand-written JSON template is fine
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 256:
                    raise KamengError(
                        ErrorCode.invalid_field_template,
                        detail=f"{name}: {bound} must be a whole number 0-256",
                    )
                lengths[bound] = value
        out.append(
            {
                "name": name,
                "type": ftype,
                "label": str(spec.get("label", name)),
                "label_en": str(spec.get("label_en", spec.get("label", name))),
                "required": bool(spec.get("required", True)),
                **({"options": list(options)} if ftype == "select" and options else {}),
                **({"pattern": pattern} if pattern else {}),
                **({"operator": operator} if operator else {}),
                **({"options_by": options_by} if options_by else {}),
                **({"values": list(values)} if values else {}),
                **({"role": role} if role else {}),
                **lengths,
            }
        )
    return out


def _check_one(spec: dict[str, Any], raw: Any) -> tuple[str | None, dict[str, str] | None]:
    name, label, label_en = spec["name"], spec["label"], spec["label_en"]
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        raw = str(raw)
    if not isinstance(raw, str):
        return None, field_error(name, "type", f"{label} 须为文本", f"{label_en} must be text")
    value = raw.strip()
    if spec["type"] in ("phone_cn", "qq", "number"):
        # Full-width digits (１３８…) are what many buyers' input methods type: fold them to ASCII.
        value = unicodedata.normalize("NFKC", value)
    if spec["type"] == "phone_cn":
        value = re.sub(r"[\s-]", "", value)
        if value.startswith("+86"):
            value = value[3:]
    if len(value) > MAX_FIELD_LEN:
        return None, field_error(name, "too_long", f"{label} 过长", f"{label_en} is too long")
    if not value:
        return None, field_error(name, "required", f"请填写{label}", f"{label_en} is required")
    ftype = spec["type"]
    checks = {
        "phone_cn": (
            _PHONE_CN,
            "格式不正确（须为 11 位大陆手机号）",
            "is not a valid mainland China mobile",
        ),
        "qq": (_QQ, "格式不正确（须为 5-12 位 QQ 号）", "is not a valid QQ number"),
        "email": (_EMAIL, "格式不正确（须为邮箱地址）", "is not a valid email address"),
    }
    if ftype in checks:
        regex, zh, en = checks[ftype]
        if not regex.fullmatch(value):
            return None, field_error(name, "format", f"{label}{zh}", f"{label_en} {en}")
    if ftype == "phone_cn" and spec.get("operator"):
        problem = _operator_problem(spec, value)
        if problem is not None:
            return None, problem
    if ftype == "number" and not re.fullmatch(r"-?[0-9]+(\.[0-9]+)?", value):
        return None, field_error(name, "format", f"{label}须为数字", f"{label_en} must be a number")
    if "values" in spec and float(value) not in {float(v) for v in spec["values"]}:
        shown = "、".join(_num(v) for v in spec["values"])
        return None, field_error(
            name,
            "denomination_unavailable",
            f"{label}只能是以下面值之一：{shown}",
            f"{label_en} must be one of the denominations on offer: {shown.replace('、', ', ')}",
        )
    if ftype == "select" and value not in spec["options"]:
        return None, field_error(
            name,
            "not_in_options",
            f"{label}须为以下之一：{'、'.join(spec['options'])}",
            f"{label_en} must be one of: {', '.join(spec['options'])}",
        )
    if "min_length" in spec and len(value) < spec["min_length"]:
        return None, field_error(
            name,
            "too_short",
            f"{label}至少 {spec['min_length']} 个字符",
            f"{label_en} needs at least {spec['min_length']} characters",
        )
    if "max_length" in spec and len(value) > spec["max_length"]:
        return None, field_error(
            name,
            "too_long",
            f"{label}最多 {spec['max_length']} 个字符",
            f"{label_en} allows at most {spec['max_length']} characters",
        )
    if "pattern" in spec and not re.fullmatch(spec["pattern"], value):
        return None, field_error(
            name, "format", f"{label}格式不正确", f"{label_en} has the wrong format"
        )
    return value, None


def _operator_problem(spec: dict[str, Any], number: str) -> dict[str, str] | None:
    """A 话费 product's number must belong to its operator (and not a virtual one)."""
    name, label, label_en = spec["name"], spec["label"], spec["label_en"]
    want = phone_cn.Operator(spec["operator"], False)
    found = phone_cn.operator_of(number)
    if found == want:
        return None
    if found is None:
        return field_error(
            name,
            "operator_unknown",
            f"{label}的号段无法识别，本商品仅支持{want.name('zh-CN')}号码",
            f"{label_en}: unknown number segment; this product is for "
            f"{want.name('en')} numbers only",
        )
    return field_error(
        name,
        "operator_mismatch",
        f"该号码属于{found.name('zh-CN')}，本商品仅支持{want.name('zh-CN')}号码",
        f"That number belongs to {found.name('en')}; this product is for "
        f"{want.name('en')} numbers only",
    )


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _dependent_problems(template: list[dict[str, Any]], clean: dict[str, str]) -> list[Any]:
    """A server that does not belong to the chosen region (the classic confusion)."""
    problems = []
    labels = {spec["name"]: (spec["label"], spec["label_en"]) for spec in template}
    for spec in template:
        by = spec.get("options_by")
        if not by or spec["name"] not in clean or by["field"] not in clean:
            continue
        parent_value = clean[by["field"]]
        allowed = by["options"].get(parent_value, [])
        if clean[spec["name"]] not in allowed:
            p_zh, p_en = labels[by["field"]]
            problems.append(
                field_error(
                    spec["name"],
                    "not_for_parent",
                    f"{spec['label']}不属于所选{p_zh}（{parent_value}），可选：{'、'.join(allowed)}",
                    f"{spec['label_en']} is not in the chosen {p_en} ({parent_value}); "
                    f"choose one of: {', '.join(allowed)}",
                )
            )
    return problems


def validate_fields(template: list[dict[str, Any]], given: Any) -> dict[str, str]:
    """Validate buyer input against a template; raises invalid_fields listing every problem."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise KamengError(
            ErrorCode.invalid_fields,
            extra={"fields": [field_error("fields", "type", "须为对象", "must be an object")]},
        )
    known = {spec["name"] for spec in template}
    errors: list[dict[str, str]] = [
        field_error(name, "unknown", f"未知字段 {name}", f"unknown field {name}")
        for name in given
        if name not in known
    ]
    clean: dict[str, str] = {}
    for spec in template:
        raw = given.get(spec["name"])
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            if spec["required"]:
                errors.append(
                    field_error(
                        spec["name"],
                        "required",
                        f"请填写{spec['label']}",
                        f"{spec['label_en']} is required",
                    )
                )
            continue
        value, problem = _check_one(spec, raw)
        if problem:
            errors.append(problem)
        elif value is not None:
            clean[spec["name"]] = value
    errors.extend(_dependent_problems(template, clean))
    if errors:
        raise KamengError(ErrorCode.invalid_fields, extra={"fields": errors})
    return clean
