"""Stable error codes with human messages in zh-CN and en.

Every refusal the platform gives — over HTTP, in the CLI, in a test — is a `KamengError` with a
code from `ErrorCode`. Codes are a public contract (resellers branch on them), so they are only
ever added, never renamed. Messages are templates filled from `params`; they never include card
keys, secrets or anything else a caller did not already know.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    # request / protocol
    invalid_request = "invalid_request"
    not_found = "not_found"
    method_not_allowed = "method_not_allowed"
    internal_error = "internal_error"
    rate_limited = "rate_limited"
    # request bodies (refused before the app reads them; kameng.security.bodylimit)
    payload_too_large = "payload_too_large"
    unsupported_media_type = "unsupported_media_type"
    too_many_form_fields = "too_many_form_fields"
    form_field_too_large = "form_field_too_large"
    # signing
    auth_missing = "auth_missing"
    auth_invalid_key = "auth_invalid_key"
    auth_key_revoked = "auth_key_revoked"
    auth_bad_signature = "auth_bad_signature"
    auth_timestamp_out_of_window = "auth_timestamp_out_of_window"
    auth_nonce_reused = "auth_nonce_reused"
    # idempotency
    idempotency_key_required = "idempotency_key_required"
    idempotency_key_invalid = "idempotency_key_invalid"
    idempotency_key_reused = "idempotency_key_reused"
    idempotency_in_flight = "idempotency_in_flight"
    # catalog / orders
    sku_not_found = "sku_not_found"
    sku_disabled = "sku_disabled"
    quantity_out_of_range = "quantity_out_of_range"
    invalid_fields = "invalid_fields"
    insufficient_balance = "insufficient_balance"
    duplicate_order_suspected = "duplicate_order_suspected"
    order_not_found = "order_not_found"
    order_not_cancelable = "order_not_cancelable"
    invalid_transition = "invalid_transition"
    concurrent_update = "concurrent_update"
    price_below_cost = "price_below_cost"
    # admin
    already_exists = "already_exists"
    invalid_amount = "invalid_amount"
    reseller_not_found = "reseller_not_found"
    tier_not_found = "tier_not_found"
    product_not_found = "product_not_found"
    invalid_field_template = "invalid_field_template"
    # members and browser forms
    email_invalid = "email_invalid"
    password_too_weak = "password_too_weak"  # noqa: S105 (a code, not a password)
    email_taken = "email_taken"
    login_failed = "login_failed"
    login_required = "login_required"
    csrf_failed = "csrf_failed"
    # payments
    gateway_not_found = "gateway_not_found"
    gateway_unavailable = "gateway_unavailable"
    pay_type_unsupported = "pay_type_unsupported"
    payment_not_found = "payment_not_found"
    order_not_payable = "order_not_payable"
    # staff, risk and review
    staff_auth_required = "staff_auth_required"
    staff_forbidden = "staff_forbidden"
    rule_set_not_found = "rule_set_not_found"
    review_item_not_found = "review_item_not_found"
    review_claimed_by_other = "review_claimed_by_other"
    review_not_claimed = "review_not_claimed"
    review_already_decided = "review_already_decided"
    review_second_reviewer_required = "review_second_reviewer_required"
    order_not_fixable = "order_not_fixable"
    # qualification documents (kameng.documents)
    qualification_required = "qualification_required"
    document_invalid = "document_invalid"
    document_not_found = "document_not_found"
    document_already_decided = "document_already_decided"
    too_many_pending_documents = "too_many_pending_documents"
    reject_reason_required = "reject_reason_required"
    # installation safety: the demo and the bundled simulators
    demo_database_in_use = "demo_database_in_use"
    simulator_on_public_url = "simulator_on_public_url"


MESSAGES: dict[ErrorCode, tuple[str, str]] = {
    ErrorCode.invalid_request: ("请求无效：{detail}", "Invalid request: {detail}"),
    ErrorCode.not_found: ("找不到该资源", "Resource not found"),
    ErrorCode.method_not_allowed: ("不支持该请求方法", "Method not allowed"),
    ErrorCode.internal_error: (
        "服务器内部错误，请稍后重试（请求号 {request_id}）",
        "Internal error, please retry later (request {request_id})",
    ),
    ErrorCode.rate_limited: (
        "请求过于频繁，请 {retry_after} 秒后再试",
        "Too many requests, retry in {retry_after} s",
    ),
    # `limit` is a size such as "64 KiB".
    ErrorCode.payload_too_large: (
        "请求内容过大：此地址最多接受 {limit}",
        "Request body too large: this address accepts at most {limit}",
    ),
    ErrorCode.unsupported_media_type: (
        "此地址不接受 {media_type} 格式的请求内容",
        "This address does not accept {media_type} request bodies",
    ),
    ErrorCode.too_many_form_fields: (
        "表单字段过多：最多 {limit} 个",
        "Too many form fields: at most {limit}",
    ),
    ErrorCode.form_field_too_large: (
        "表单中有字段过长：每个字段最多 {limit}",
        "A form field is too long: at most {limit} each",
    ),
    ErrorCode.auth_missing: (
        "缺少签名头：{headers}",
        "Missing signature headers: {headers}",
    ),
    ErrorCode.auth_invalid_key: ("API Key 无效", "Unknown API key"),
    ErrorCode.auth_key_revoked: ("API Key 已被吊销", "API key has been revoked"),
    ErrorCode.auth_bad_signature: (
        "签名校验失败，请检查密钥与待签名串",
        "Signature mismatch: check the secret and the string to sign",
    ),
    ErrorCode.auth_timestamp_out_of_window: (
        "时间戳超出允许范围（±{window} 秒），请校准时钟",
        "Timestamp outside the allowed window (±{window} s); check your clock",
    ),
    ErrorCode.auth_nonce_reused: (
        "Nonce 已使用过，疑似重放请求",
        "Nonce already used: the request looks like a replay",
    ),
    ErrorCode.idempotency_key_required: (
        "该请求需要 Idempotency-Key 头",
        "This request needs an Idempotency-Key header",
    ),
    ErrorCode.idempotency_key_invalid: (
        "Idempotency-Key 须为 1 至 255 个可见字符",
        "Idempotency-Key must be 1 to 255 visible characters",
    ),
    ErrorCode.idempotency_key_reused: (
        "该 Idempotency-Key 已用于另一个不同的请求",
        "This Idempotency-Key was already used with a different request body",
    ),
    ErrorCode.idempotency_in_flight: (
        "使用该 Idempotency-Key 的请求仍在处理中，请稍后重试",
        "A request with this Idempotency-Key is still being processed; retry shortly",
    ),
    ErrorCode.sku_not_found: ("商品规格 {sku} 不存在", "SKU {sku} does not exist"),
    ErrorCode.sku_disabled: ("商品规格 {sku} 已下架", "SKU {sku} is not on sale"),
    ErrorCode.quantity_out_of_range: (
        "购买数量须在 {min} 至 {max} 之间",
        "Quantity must be between {min} and {max}",
    ),
    ErrorCode.invalid_fields: (
        "下单信息有误，请检查标出的字段",
        "Some order fields are invalid; see the listed fields",
    ),
    ErrorCode.insufficient_balance: (
        "余额不足：需要 {needed}，可用 {available}",
        "Insufficient balance: {needed} needed, {available} available",
    ),
    ErrorCode.duplicate_order_suspected: (
        "疑似重复下单：{minutes} 分钟内已有相同订单 {order_no}。"
        "如确需再次购买，请带上 confirm_duplicate=true 重新提交",
        "Possible duplicate: order {order_no} for the same item and details was placed in the "
        "last {minutes} minutes. Resend with confirm_duplicate=true to buy again",
    ),
    ErrorCode.order_not_found: ("订单不存在", "Order not found"),
    ErrorCode.order_not_cancelable: (
        "订单当前状态（{status}）不可取消",
        "The order cannot be canceled in its current status ({status})",
    ),
    ErrorCode.invalid_transition: (
        "订单不能从 {from_status} 变为 {to_status}",
        "An order cannot move from {from_status} to {to_status}",
    ),
    ErrorCode.concurrent_update: (
        "订单已被其他操作更新，请刷新后重试",
        "The order was changed by another action; reload and retry",
    ),
    ErrorCode.price_below_cost: (
        "售价 {price} 低于成本 {cost}，需明确允许",
        "Price {price} is below cost {cost}; it must be explicitly allowed",
    ),
    ErrorCode.already_exists: ("{what} 已存在", "{what} already exists"),
    ErrorCode.invalid_amount: ("金额无效：{detail}", "Invalid amount: {detail}"),
    ErrorCode.reseller_not_found: ("代理商 {name} 不存在", "Reseller {name} does not exist"),
    ErrorCode.tier_not_found: ("等级 {tier} 不存在", "Tier {tier} does not exist"),
    ErrorCode.product_not_found: ("商品 {product} 不存在", "Product {product} does not exist"),
    ErrorCode.invalid_field_template: (
        "下单字段模板无效：{detail}",
        "Invalid buyer-field template: {detail}",
    ),
    ErrorCode.email_invalid: ("邮箱地址格式不正确", "That email address is not valid"),
    ErrorCode.password_too_weak: (
        "密码须为 {min} 至 {max} 个字符，且不能全部相同",
        "The password must be {min} to {max} characters and not all the same character",
    ),
    ErrorCode.email_taken: ("该邮箱已注册，请直接登录", "That email is already registered; log in"),
    ErrorCode.login_failed: ("邮箱或密码错误", "Wrong email or password"),
    ErrorCode.login_required: ("请先登录", "Please log in first"),
    ErrorCode.csrf_failed: (
        "表单已过期或来源无效，请刷新页面后重新提交",
        "The form expired or did not come from this site; reload the page and submit again",
    ),
    ErrorCode.gateway_not_found: (
        "支付方式 {gateway} 不存在",
        "Payment gateway {gateway} not found",
    ),
    ErrorCode.gateway_unavailable: (
        "暂无可用的在线支付方式",
        "No online payment method is available right now",
    ),
    ErrorCode.pay_type_unsupported: (
        "不支持的支付方式：{pay_type}",
        "Unsupported payment method: {pay_type}",
    ),
    ErrorCode.payment_not_found: ("支付单不存在", "Payment not found"),
    ErrorCode.order_not_payable: (
        "订单当前状态（{status}）无需或不能支付",
        "The order cannot be paid in its current status ({status})",
    ),
    ErrorCode.staff_auth_required: (
        "需要员工令牌（Authorization: Bearer …）",
        "A staff token is required (Authorization: Bearer …)",
    ),
    ErrorCode.staff_forbidden: (
        "您的角色（{role}）不能执行此操作",
        "Your role ({role}) may not do this",
    ),
    ErrorCode.rule_set_not_found: (
        "规则集版本 {version} 不存在",
        "Rule set version {version} not found",
    ),
    ErrorCode.review_item_not_found: ("审核单不存在", "Review item not found"),
    ErrorCode.review_claimed_by_other: (
        "该审核单已由 {reviewer} 认领，认领到 {until}",
        "This item is claimed by {reviewer} until {until}",
    ),
    ErrorCode.review_not_claimed: (
        "请先认领该审核单再做决定",
        "Claim this item before deciding it",
    ),
    ErrorCode.review_already_decided: (
        "该审核单已处理（{status}）",
        "This item has already been decided ({status})",
    ),
    ErrorCode.review_second_reviewer_required: (
        "金额较大，需要另一位审核员再次批准（第一位：{first}）",
        "A large amount needs a second, different reviewer to approve (first: {first})",
    ),
    ErrorCode.order_not_fixable: (
        "订单当前状态（{status}）不需要补充信息",
        "The order does not need corrected information in its status ({status})",
    ),
    # qualification documents (kameng.documents)
    # `kind` is " (business_license)", or "" when any kind will do.
    ErrorCode.qualification_required: (
        "该商品需要账户中有一份已审核通过且未过期的资质文件{kind}。"
        "请登录后在“我的账户 › 资质文件”（{path}）上传，审核通过后即可购买",
        "This product needs an approved, unexpired document{kind} on your account. "
        "Log in and upload it under My account › Documents ({path}); you can buy once it "
        "is approved",
    ),
    # The specific problem is in `fields` (localised like invalid_fields').
    ErrorCode.document_invalid: (
        "上传的资质文件不符合要求：文件须为 PDF、PNG 或 JPEG（按文件内容判断，与文件名无关），"
        "不超过 {max_mb} MB；类型须以小写字母开头，只含小写字母、数字和下划线",
        "The uploaded document was refused: the file must be a PDF, PNG or JPEG (judged by "
        "its content, not its name) of at most {max_mb} MB, and the kind must start with a "
        "lowercase letter and use only a-z, 0-9 and _",
    ),
    ErrorCode.document_not_found: ("资质文件不存在", "Document not found"),
    ErrorCode.document_already_decided: (
        "该资质文件已审核（{status}），不能再次审核",
        "This document has already been decided ({status})",
    ),
    ErrorCode.too_many_pending_documents: (
        "您已有 {limit} 份资质文件在等待审核，请等审核完成后再上传",
        "You already have {limit} documents waiting for review; upload more once decided",
    ),
    ErrorCode.reject_reason_required: (
        "驳回资质文件须填写原因（会展示给买家）",
        "Rejecting a document needs a reason (the buyer is shown it)",
    ),
    ErrorCode.demo_database_in_use: (
        "数据库里有 kameng demo 没有创建的数据（{found}），演示数据不会写入在用的店铺。"
        "请让 KAMENG_DATA_DIR / KAMENG_DATABASE_URL 指向一个空数据库；确定要写入请加 --force",
        "The database holds data kameng demo did not create ({found}); the demo is not seeded "
        "into a shop in use. Point KAMENG_DATA_DIR / KAMENG_DATABASE_URL at an empty database, "
        "or add --force if you are sure",
    ),
    ErrorCode.simulator_on_public_url: (
        "已启用演示或模拟的支付网关/上游（{what}），而公开地址 {public_url} 不是本机回环地址："
        "任何人都能在模拟网关上“付款”并拿走卡密。演示只在 127.0.0.1 / localhost 上运行；"
        "对外的店铺请用不含它们的数据库（或停用它们）",
        "A demo or simulator payment gateway / supplier is enabled ({what}) while the public URL "
        '{public_url} is not a loopback address: anyone could "pay" at the simulator and take '
        "card keys. Run demos on 127.0.0.1 / localhost only; give a public shop a database "
        "without them (or disable them)",
    ),
}

HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.invalid_request: 400,
    ErrorCode.not_found: 404,
    ErrorCode.method_not_allowed: 405,
    ErrorCode.internal_error: 500,
    ErrorCode.rate_limited: 429,
    ErrorCode.payload_too_large: 413,
    ErrorCode.unsupported_media_type: 415,
    ErrorCode.too_many_form_fields: 413,
    ErrorCode.form_field_too_large: 413,
    ErrorCode.auth_missing: 401,
    ErrorCode.auth_invalid_key: 401,
    ErrorCode.auth_key_revoked: 401,
    ErrorCode.auth_bad_signature: 401,
    ErrorCode.auth_timestamp_out_of_window: 401,
    ErrorCode.auth_nonce_reused: 401,
    ErrorCode.idempotency_key_required: 400,
    ErrorCode.idempotency_key_invalid: 400,
    ErrorCode.idempotency_key_reused: 422,
    ErrorCode.idempotency_in_flight: 409,
    ErrorCode.sku_not_found: 404,
    ErrorCode.sku_disabled: 409,
    ErrorCode.quantity_out_of_range: 422,
    ErrorCode.invalid_fields: 422,
    ErrorCode.insufficient_balance: 402,
    ErrorCode.duplicate_order_suspected: 409,
    ErrorCode.order_not_found: 404,
    ErrorCode.order_not_cancelable: 409,
    ErrorCode.invalid_transition: 409,
    ErrorCode.concurrent_update: 409,
    ErrorCode.price_below_cost: 422,
    ErrorCode.already_exists: 409,
    ErrorCode.invalid_amount: 422,
    ErrorCode.reseller_not_found: 404,
    ErrorCode.tier_not_found: 404,
    ErrorCode.product_not_found: 404,
    ErrorCode.invalid_field_template: 422,
    ErrorCode.email_invalid: 422,
    ErrorCode.password_too_weak: 422,
    ErrorCode.email_taken: 409,
    ErrorCode.login_failed: 401,
    ErrorCode.login_required: 401,
    ErrorCode.csrf_failed: 403,
    ErrorCode.gateway_not_found: 404,
    ErrorCode.gateway_unavailable: 503,
    ErrorCode.pay_type_unsupported: 422,
    ErrorCode.payment_not_found: 404,
    ErrorCode.order_not_payable: 409,
    ErrorCode.staff_auth_required: 401,
    ErrorCode.staff_forbidden: 403,
    ErrorCode.rule_set_not_found: 404,
    ErrorCode.review_item_not_found: 404,
    ErrorCode.review_claimed_by_other: 409,
    ErrorCode.review_not_claimed: 409,
    ErrorCode.review_already_decided: 409,
    ErrorCode.review_second_reviewer_required: 409,
    ErrorCode.order_not_fixable: 409,
    # qualification documents (kameng.documents)
    ErrorCode.qualification_required: 403,
    ErrorCode.document_invalid: 422,
    ErrorCode.document_not_found: 404,
    ErrorCode.document_already_decided: 409,
    ErrorCode.too_many_pending_documents: 409,
    ErrorCode.reject_reason_required: 422,
    ErrorCode.demo_database_in_use: 409,
    ErrorCode.simulator_on_public_url: 409,
}


def normalize_language(accept_language: str | None, default: str = "zh-CN") -> str:
    """Pick zh-CN or en from an Accept-Language header (q-values honoured, zh-CN default)."""
    if not accept_language:
        return default
    best: tuple[float, str] | None = None
    for part in accept_language.split(","):
        tag, *params = (p.strip() for p in part.split(";"))
        tag = tag.lower()
        weight = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(value.strip())
                except ValueError:
                    weight = 0.0
        if weight <= 0:  # q=0 means "not acceptable"
            continue
        lang = "en" if tag.startswith("en") else "zh-CN" if tag.startswith("zh") else None
        if lang and (best is None or weight > best[0]):
            best = (weight, lang)
    return best[1] if best else default


class KamengError(Exception):
    """A refusal with a stable code. `extra` is merged into the JSON error object."""

    def __init__(
        self, code: ErrorCode, *, extra: dict[str, Any] | None = None, **params: Any
    ) -> None:
        self.code = code
        self.params = params
        self.extra = extra or {}
        super().__init__(self.message("en"))

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 400)

    def message(self, language: str = "zh-CN") -> str:
        zh, en = MESSAGES[self.code]
        template = en if language == "en" else zh
        try:
            return template.format(**self.params)
        except (KeyError, IndexError):
            return template

    def to_dict(self, language: str = "zh-CN") -> dict[str, Any]:
        body: dict[str, Any] = {"code": str(self.code), "message": self.message(language)}
        body.update(self.extra)
        if isinstance(body.get("fields"), list):
            body["fields"] = [_localize_field(f, language) for f in body["fields"]]
        return {"error": body}


def _localize_field(problem: Any, language: str) -> Any:
    if not isinstance(problem, dict) or "message_zh" not in problem:
        return problem
    out = {k: v for k, v in problem.items() if k not in ("message_zh", "message_en")}
    out["message"] = problem["message_en"] if language == "en" else problem["message_zh"]
    return out


def field_error(field: str, code: str, zh: str, en: str) -> dict[str, str]:
    """One field-level problem; both languages are kept until the edge picks one."""
    return {"field": field, "code": code, "message_zh": zh, "message_en": en}
