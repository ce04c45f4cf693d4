"""What the worker keeps in the database: who is alive (the outbox lives in `kameng.notify`)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from kameng.db import Base, UTCDateTime


class WorkerHeartbeat(Base):
    """One row per worker process; `/healthz` and `/metrics` count the ones seen recently."""

    __tablename__ = "worker_heartbeats"
    worker_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))  # running, stopping, stopped
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    steps: Mapped[int] = mapped_column(BigInteger, default=0)
