"""Plain words for statuses and reasons, in zh-CN and en.

The API returns the stable codes *and* these texts, so a reseller can show its customer a
sentence instead of an enum. A code without a text falls back to the code itself, never to
silence.
"""

from __future__ import annotations

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
    "canceled_by_buyer": ("买家取消，款项已退回余额", "Canceled by buyer; refunded to balance"),
    "canceled_by_staff": ("客服取消，款项已退回余额", "Canceled by staff; refunded to balance"),
}


def status_text(status: str, language: str) -> str:
    zh, en = STATUS_TEXT.get(status, (status, status))
    return en if language == "en" else zh


def reason_text(reason: str, language: str) -> str:
    if not reason:
        return ""
    zh, en = REASON_TEXT.get(reason, (reason, reason))
    return en if language == "en" else zh
