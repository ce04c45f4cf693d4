"""Plain words for statuses and reasons, in zh-CN and en.

The API returns the stable codes *and* these texts, so a reseller can show its customer a
sentence instead of an enum. A code without a text falls back to the code itself, never to
silence.
"""

from __future__ import annotations

from kameng.risk.rules import CATEGORIES

STATUS_TEXT: dict[str, tuple[str, str]] = {
    "pending_payment": ("待付款", "Awaiting payment"),
    "paid": ("已付款", "Paid"),
    "screening": ("风控检查中", "Being screened"),
    "review": ("审核中", "Under review"),
    "fulfilling": ("处理中", "Being fulfilled"),
    "backordered": ("等待补货", "Waiting for stock"),
    "needs_buyer_action": ("需要您补充信息", "Needs your action"),
    "delivered": ("已发货", "Delivered"),
    "completed": ("已完成", "Completed"),
    "disputed": ("售后处理中", "In dispute"),
    "expired": ("已过期", "Expired"),
    "rejected": ("已拒绝（已退款）", "Rejected (refunded)"),
    "canceled": ("已取消（已退款）", "Canceled (refunded)"),
    "refunded": ("已退款", "Refunded"),
    "replaced": ("已换货", "Replaced"),
}

REASON_TEXT: dict[str, tuple[str, str]] = {
    "paid_from_balance": ("已从余额扣款", "Paid from balance"),
    "allocating_own_stock": ("正在从库存分配卡密", "Allocating keys from stock"),
    "own_stock": ("已从库存发放卡密", "Keys delivered from stock"),
    "out_of_stock": (
        "库存不足，已冻结款项，补货后自动发货，超时自动退款",
        "Out of stock: payment is held; it ships automatically on restock or is refunded "
        "when the wait runs out",
    ),
    "awaiting_supplier": ("等待上游供货", "Waiting for the supplier"),
    "awaiting_staff": ("等待人工处理", "Waiting for staff to fulfil"),
    "awaiting_supplier_callback": (
        "上游已受理，等待上游发货结果（我们也会定时查询）",
        "The supplier accepted the order; waiting for its result (we also check on it)",
    ),
    "upstream_backordered": (
        "上游暂时缺货，已在上游排队，上游补货后自动发货；超时自动退款",
        "The supplier is out of stock and has queued the order; it ships when they restock, "
        "or is refunded when the wait runs out",
    ),
    "upstream_delivered": ("上游已发货", "Delivered by the supplier"),
    "upstream_partial": (
        "上游已发部分卡密，等待其余部分；超时未到则退还未发部分",
        "The supplier delivered part of the order; waiting for the rest (refunded if it does "
        "not come in time)",
    ),
    "upstream_partial_refunded": (
        "上游只发了部分卡密，已发放这部分，其余金额已退回余额",
        "The supplier delivered only part; that part is delivered and the rest refunded to balance",
    ),
    "upstream_unknown_outcome": (
        "上游响应异常（超时或出错），正在向上游查询结果，不会重复下单",
        "The supplier did not answer clearly (timeout or error); we are asking it for the "
        "result and will not buy twice",
    ),
    "upstream_out_of_stock": (
        "上游缺货，款项已冻结；上游补货或有货源时自动发货，超时自动退款",
        "The supplier is out of stock; payment is held, it ships automatically when stock "
        "returns or is refunded when the wait runs out",
    ),
    "upstream_unavailable": (
        "所有上游暂时不可用（维护或故障），稍后自动重试，超时自动退款",
        "Every supplier is unavailable for now (maintenance or failure); retrying "
        "automatically, refunded if the wait runs out",
    ),
    "upstream_maintenance": (
        "上游维护中，正在切换其他货源",
        "Supplier in maintenance; trying another source",
    ),
    "upstream_insufficient_balance": (
        "上游账户余额不足，正在切换其他货源",
        "Our account at the supplier is low; trying another source",
    ),
    "upstream_not_received": (
        "上游未收到订单，正在切换其他货源",
        "The supplier never received the order; trying another source",
    ),
    "no_supplier": (
        "暂无可用货源，补货后自动发货，超时自动退款",
        "No source available; ships on restock or is refunded when the wait runs out",
    ),
    "restocked": ("已补货并按排队顺序发货", "Restocked and delivered in queue order"),
    "sla_expired_refund": (
        "超过承诺时间仍未发货，款项已自动退回余额",
        "Not delivered within the promised time; refunded to balance automatically",
    ),
    "staff_sla_expired": (
        "人工处理超时，款项已自动退回余额",
        "Staff did not deliver in time; refunded to balance automatically",
    ),
    "buyer_info_invalid": (
        "上游认为充值信息有误，请核对后修改或取消（取消即退款）",
        "The supplier refused the account details; please correct them or cancel for a refund",
    ),
    "buyer_action_sla_expired": (
        "等待您补充信息超时，款项已自动退回余额",
        "Your correction did not arrive in time; refunded to balance automatically",
    ),
    "canceled_by_buyer": ("买家取消，款项已退回余额", "Canceled by buyer; refunded to balance"),
    "canceled_before_payment": (
        "您在付款前取消了订单；如已付款，款项到账后会退回",
        "You canceled before paying; if you did pay, the money is returned when it arrives",
    ),
    "canceled_by_staff": ("客服取消，款项已退回余额", "Canceled by staff; refunded to balance"),
    "awaiting_payment": (
        "等待付款，请在截止时间前完成支付；付款后自动发货",
        "Waiting for your payment before the deadline; it ships automatically once paid",
    ),
    "paid_by_gateway": ("在线支付已到账", "Online payment received"),
    "payment_timeout": (
        "超时未付款，订单已关闭；如您已付款，款项到账后会自动补发或退回",
        "Not paid in time, so the order closed; if you did pay, the money is applied "
        "automatically when it arrives",
    ),
    "late_payment_accepted": (
        "订单关闭后才收到付款，库存仍在，已继续发货",
        "Payment arrived after the order closed; stock was still there, so it ships",
    ),
    "late_payment_credited": (
        "订单关闭后才收到付款，已无法发货，款项已退回您的余额（游客订单原路退回）",
        "Payment arrived after the order closed and it can no longer ship; the money is "
        "credited to your balance (a guest order is refunded to how you paid)",
    ),
    "payment_amount_mismatch": (
        "收到的付款金额与订单不符，已暂停发货并转人工核对",
        "The amount paid differs from the order; it will not ship until staff check it",
    ),
    "payment_short_credited": (
        "收到的付款不足订单金额，已退回您的余额（游客订单原路退回），订单已关闭",
        "The payment was short of the order's amount: it is credited back (a guest order is "
        "refunded to how you paid) and the order is closed",
    ),
    "payment_returned": (
        "收到的付款与订单不符，已原路退回，订单已关闭",
        "The payment did not match the order; it was sent back and the order is closed",
    ),
    "payment_unreadable_amount": (
        "支付平台返回的金额无法识别，已转人工核对",
        "The payment platform's amount could not be read; staff will check it",
    ),
    "payment_currency_mismatch": (
        "收到的付款币种与订单不符，已暂停发货并转人工核对",
        "The payment's currency differs from the order's; staff will check it",
    ),
}


REASON_TEXT.update(
    {
        "risk_check": ("安全检查中", "Safety check in progress"),
        "risk_rejected": (
            "订单未通过安全检查，已取消，款项已退回余额",
            "The order did not pass the safety check; it is canceled and refunded to balance",
        ),
        "review_approved": ("审核已通过", "Review passed"),
        "upstream_denomination_closed": (
            "上游该面值暂停充值，正在切换其他货源；无货源时等待恢复，超时自动退款",
            "The supplier has closed this denomination for now; trying another source, "
            "waiting for it to reopen, or refunded when the wait runs out",
        ),
        "buyer_info_corrected": (
            "已收到您修改的信息，正在重新提交上游处理",
            "Your corrected details arrived; the order is going to the supplier again",
        ),
        "review_rejected": (
            "订单未通过人工审核，款项已退回余额",
            "The order did not pass review; refunded to balance",
        ),
        "review_sla_refund": (
            "审核未能在承诺时间内完成，款项已自动退回余额",
            "Review could not finish in the promised time; refunded to balance automatically",
        ),
    }
)

# Orders under review: the buyer sees a plain category and the decision time, never the rule.
for _category, (_zh, _en) in CATEGORIES.items():
    REASON_TEXT[f"risk_review_{_category}"] = (
        f"订单需人工审核（{_zh}），款项和库存已为您保留，将在承诺时间前处理完毕",
        f"Your order is being reviewed ({_en}); your payment and stock are held for you and "
        "a decision comes before the promised time",
    )


# A guest has no balance: money a guest is owed goes back the way it was paid (the worker
# refunds it through the gateway). These say so instead of "refunded to balance".
GUEST_REASON_TEXT: dict[str, tuple[str, str]] = {
    "upstream_partial_refunded": (
        "上游只发了部分卡密，已发放这部分，其余金额将原路退回",
        "The supplier delivered only part; that part is delivered and the rest is refunded "
        "to how you paid",
    ),
    "sla_expired_refund": (
        "超过承诺时间仍未发货，款项将自动原路退回",
        "Not delivered within the promised time; refunded automatically to how you paid",
    ),
    "staff_sla_expired": (
        "人工处理超时，款项将自动原路退回",
        "Staff did not deliver in time; refunded automatically to how you paid",
    ),
    "buyer_action_sla_expired": (
        "等待您补充信息超时，款项将自动原路退回",
        "Your correction did not arrive in time; refunded automatically to how you paid",
    ),
    "canceled_by_staff": (
        "客服取消，款项将原路退回",
        "Canceled by staff; refunded to how you paid",
    ),
    "late_payment_credited": (
        "订单关闭后才收到付款，已无法发货，款项将自动原路退回",
        "Payment arrived after the order closed and it can no longer ship; it is refunded "
        "automatically to how you paid",
    ),
    "canceled_by_buyer": (
        "您已取消订单，款项将原路退回",
        "You canceled the order; it is refunded to how you paid",
    ),
    "risk_rejected": (
        "订单未通过安全检查，已取消，款项将原路退回",
        "The order did not pass the safety check; it is canceled and refunded to how you paid",
    ),
    "review_rejected": (
        "订单未通过人工审核，款项将原路退回",
        "The order did not pass review; refunded to how you paid",
    ),
    "review_sla_refund": (
        "审核未能在承诺时间内完成，款项将自动原路退回",
        "Review could not finish in the promised time; refunded automatically to how you paid",
    ),
    "payment_short_credited": (
        "收到的付款不足订单金额，订单已关闭，款项将原路退回",
        "The payment was short of the order's amount: the order is closed and the money is "
        "refunded to how you paid",
    ),
}


def status_text(status: str, language: str) -> str:
    zh, en = STATUS_TEXT.get(status, (status, status))
    return en if language == "en" else zh


def reason_text(reason: str, language: str, *, guest: bool = False) -> str:
    """The sentence for a reason code; `guest` picks the wording for a buyer without a
    balance (refunds go back the way they were paid)."""
    if not reason:
        return ""
    texts = (GUEST_REASON_TEXT.get(reason) if guest else None) or REASON_TEXT.get(reason)
    if texts is None and reason.startswith("upstream_"):
        # A supplier's own refusal code we have no sentence for: still say what it means.
        code = reason.removeprefix("upstream_")
        texts = (
            f"上游拒绝（{code}），正在切换其他货源",
            f"Supplier refused ({code}); trying another source",
        )
    zh, en = texts or (reason, reason)
    return en if language == "en" else zh
