"""Imports every domain's tables so metadata (and Alembic) sees the whole schema."""

from kameng.audit.models import AuditEntry
from kameng.catalog.models import Category, Product, Sku
from kameng.documents.models import BuyerDocument
from kameng.idempotency.models import IdempotencyRecord
from kameng.inventory.models import CardKey, KeyReveal, StockBatch
from kameng.ledger.models import Account, Entry, Hold, LedgerTransaction
from kameng.members.models import Member, MemberSession
from kameng.notify.models import OutboxMessage
from kameng.orders.models import Delivery, Order, OrderEvent, OrderLine
from kameng.payments.models import Payment, PaymentGateway, PaymentNotify, Payout
from kameng.pipeline.models import WorkerHeartbeat
from kameng.pricing.models import Tier, TierPrice
from kameng.resellers.models import ApiCredential, ApiNonce, Reseller
from kameng.review.models import ReviewDecision, ReviewItem
from kameng.risk.models import RiskFact, RiskListEntry, RiskRuleSet, RiskScreening
from kameng.staff.models import StaffMember
from kameng.suppliers.models import Procurement, Supplier, SupplierEvent, SupplierOffer

__all__ = [
    "Account",
    "ApiCredential",
    "ApiNonce",
    "AuditEntry",
    "BuyerDocument",
    "CardKey",
    "Category",
    "Delivery",
    "Entry",
    "Hold",
    "IdempotencyRecord",
    "KeyReveal",
    "LedgerTransaction",
    "Member",
    "MemberSession",
    "Order",
    "OrderEvent",
    "OrderLine",
    "OutboxMessage",
    "Payment",
    "PaymentGateway",
    "PaymentNotify",
    "Payout",
    "Procurement",
    "Product",
    "Reseller",
    "ReviewDecision",
    "ReviewItem",
    "RiskFact",
    "RiskListEntry",
    "RiskRuleSet",
    "RiskScreening",
    "Sku",
    "StaffMember",
    "StockBatch",
    "Supplier",
    "SupplierEvent",
    "SupplierOffer",
    "Tier",
    "TierPrice",
    "WorkerHeartbeat",
]
