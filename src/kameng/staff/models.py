"""Staff members. Only the SHA-256 of a token is stored, as for member sessions."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import Boolean, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from kameng.db import Base, BigId, UTCDateTime, utcnow


class Role(StrEnum):
    admin = "admin"  # everything, including rules and lists
    reviewer = "reviewer"  # the review queue and qualification documents
    support = "support"
    finance = "finance"


class StaffMember(Base):
    __tablename__ = "staff"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
