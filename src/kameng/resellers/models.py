"""Resellers, their API credentials (secrets sealed at rest) and remembered nonces."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from kameng.db import Base, BigId, UTCDateTime, utcnow


class Reseller(Base):
    __tablename__ = "resellers"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    tier_id: Mapped[int] = mapped_column(ForeignKey("tiers.id"))
    status: Mapped[str] = mapped_column(String(16), default="active")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiCredential(Base):
    __tablename__ = "api_credentials"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    reseller_id: Mapped[int] = mapped_column(ForeignKey("resellers.id"), index=True)
    api_key: Mapped[str] = mapped_column(String(64), unique=True)
    sealed_secret: Mapped[bytes] = mapped_column(LargeBinary)
    status: Mapped[str] = mapped_column(String(16), default="active")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class ApiNonce(Base):
    """Nonces seen within the signature window; a second use is a replay."""

    __tablename__ = "api_nonces"
    __table_args__ = (
        UniqueConstraint("credential_id", "nonce", name="uq_api_nonce"),
        Index("ix_api_nonces_expires", "expires_at"),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    credential_id: Mapped[int] = mapped_column(BigInteger)
    nonce: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
