"""Resellers and their API credentials; request authentication for the Reseller API.

An API secret is shown once at creation and stored sealed (AES-GCM under a key derived from the
master key), never in plain text. Authentication needs the plaintext to recompute HMACs, so the
unsealed secret is cached in memory per credential — the status is still read from the database
on every request, so revocation takes effect immediately.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from kameng.audit import service as audit
from kameng.db import RawSQL, db_time, table, utcnow
from kameng.errors import ErrorCode, KamengError
from kameng.ledger import service as ledger
from kameng.ledger.models import Account
from kameng.pricing.models import Tier
from kameng.resellers.models import ApiCredential, ApiNonce, Reseller
from kameng.security.crypto import Vault

_cred = table(ApiCredential)
_reseller = table(Reseller)
_nonce = table(ApiNonce)
_tier = table(Tier)
_acc = table(Account)

_AUTH_QUERY = RawSQL(
    "SELECT c.id, c.status, c.sealed_secret, c.reseller_id, r.name, r.status, r.tier_id, a.id "
    "FROM api_credentials c JOIN resellers r ON r.id = c.reseller_id "
    "LEFT JOIN ledger_accounts a ON a.kind = 'wallet' AND a.owner_type = 'reseller' "
    "AND a.owner_id = r.id AND a.currency = 'CNY' "
    "WHERE c.api_key = :api_key"
)


@dataclass(frozen=True, slots=True)
class Caller:
    credential_id: int
    reseller_id: int
    reseller_name: str
    tier_id: int
    secret: str
    wallet_id: int

    @property
    def actor(self) -> str:
        return f"reseller:{self.reseller_name}"

    @property
    def scope(self) -> str:
        return f"reseller:{self.reseller_id}"


@dataclass(frozen=True, slots=True)
class IssuedCredential:
    reseller_id: int
    name: str
    api_key: str
    api_secret: str


def _credential_context(api_key: str) -> str:
    return f"api-secret|{api_key}"


def _issue(session: Session, vault: Vault, reseller: Reseller) -> IssuedCredential:
    api_key = "ak_" + secrets.token_hex(12)
    api_secret = "sk_" + secrets.token_urlsafe(32)
    session.add(
        ApiCredential(
            reseller_id=reseller.id,
            api_key=api_key,
            sealed_secret=vault.seal(api_secret, _credential_context(api_key)),
            status="active",
        )
    )
    session.flush()
    return IssuedCredential(reseller.id, reseller.name, api_key, api_secret)


def create_reseller(
    session: Session, vault: Vault, *, name: str, tier_code: str, actor: str
) -> IssuedCredential:
    name = name.strip()
    if not name or len(name) > 100:
        raise KamengError(ErrorCode.invalid_request, detail="name must be 1-100 characters")
    if session.scalar(select(Reseller.id).where(Reseller.name == name)) is not None:
        raise KamengError(ErrorCode.already_exists, what=f"reseller {name}")
    tier = session.scalar(select(Tier).where(Tier.code == tier_code))
    if tier is None:
        raise KamengError(ErrorCode.tier_not_found, tier=tier_code)
    reseller = Reseller(name=name, tier_id=tier.id, status="active")
    session.add(reseller)
    session.flush()
    ledger.wallet_account(session.connection(), owner_type="reseller", owner_id=reseller.id)
    issued = _issue(session, vault, reseller)
    audit.record(
        session,
        actor=actor,
        action="reseller.create",
        target_type="reseller",
        target_id=reseller.id,
        details={"tier": tier_code, "api_key": issued.api_key},
    )
    return issued


def get_reseller(session: Session, *, name: str) -> Reseller:
    reseller = session.scalar(select(Reseller).where(Reseller.name == name))
    if reseller is None:
        raise KamengError(ErrorCode.reseller_not_found, name=name)
    return reseller


def rotate_credentials(
    session: Session, vault: Vault, *, name: str, actor: str
) -> IssuedCredential:
    """Revoke every active key of the reseller and issue a new one."""
    reseller = get_reseller(session, name=name)
    revoked = revoke_credentials(session, name=name, actor=actor)
    issued = _issue(session, vault, reseller)
    audit.record(
        session,
        actor=actor,
        action="reseller.rotate_key",
        target_type="reseller",
        target_id=reseller.id,
        details={"revoked": revoked, "api_key": issued.api_key},
    )
    return issued


def revoke_credentials(
    session: Session, *, name: str, actor: str, api_key: str | None = None
) -> list[str]:
    reseller = get_reseller(session, name=name)
    stmt = select(ApiCredential).where(
        ApiCredential.reseller_id == reseller.id, ApiCredential.status == "active"
    )
    if api_key:
        stmt = stmt.where(ApiCredential.api_key == api_key)
    revoked = []
    for cred in session.scalars(stmt):
        cred.status = "revoked"
        cred.revoked_at = utcnow()
        revoked.append(cred.api_key)
    audit.record(
        session,
        actor=actor,
        action="reseller.revoke_key",
        target_type="reseller",
        target_id=reseller.id,
        details={"api_keys": revoked},
    )
    return revoked


def set_tier(session: Session, *, name: str, tier_code: str, actor: str) -> None:
    reseller = get_reseller(session, name=name)
    tier = session.scalar(select(Tier).where(Tier.code == tier_code))
    if tier is None:
        raise KamengError(ErrorCode.tier_not_found, tier=tier_code)
    old = reseller.tier_id
    reseller.tier_id = tier.id
    audit.record(
        session,
        actor=actor,
        action="reseller.set_tier",
        target_type="reseller",
        target_id=reseller.id,
        details={"from": old, "to": tier.id},
    )


class Authenticator:
    """Looks up callers by API key; caches unsealed secrets (never statuses)."""

    def __init__(self, vault: Vault) -> None:
        self.vault = vault
        self._secrets: dict[tuple[int, bytes], str] = {}

    def caller(self, conn: Connection, api_key: str) -> Caller:
        return self._caller(conn, api_key, _AUTH_QUERY.one(conn, {"api_key": api_key}))

    def caller_and_nonce(
        self, conn: Connection, api_key: str, *, nonce: str, now: datetime, window_s: int
    ) -> tuple[Caller, bool]:
        """The caller, and whether `nonce` was fresh (it is now recorded).

        The caller's transaction must roll back if it then refuses the request (bad signature,
        revoked key): the nonce is recorded before the signature is checked. On PostgreSQL both
        happen in one statement, saving a round trip on every signed request.
        """
        expires_at = db_time(conn, now + timedelta(seconds=2 * window_s))
        if conn.dialect.name == "postgresql":
            row = _AUTH_AND_NONCE_PG.one(
                conn, {"api_key": api_key, "nonce": nonce, "expires_at": expires_at}
            )
            caller = self._caller(conn, api_key, row[:8] if row else None)
            return caller, bool(row[8])
        caller = self.caller(conn, api_key)
        fresh = _INSERT_NONCE.one(
            conn,
            {"credential_id": caller.credential_id, "nonce": nonce, "expires_at": expires_at},
        )
        return caller, fresh is not None

    def _caller(self, conn: Connection, api_key: str, row: Any) -> Caller:
        if row is None:
            raise KamengError(ErrorCode.auth_invalid_key)
        cred_id, status, sealed_raw, reseller_id, name, reseller_status, tier_id, wallet_id = row
        if status != "active" or reseller_status != "active":
            raise KamengError(ErrorCode.auth_key_revoked)
        sealed = bytes(sealed_raw)
        secret = self._secrets.get((cred_id, sealed))
        if secret is None:
            secret = self.vault.unseal(sealed, _credential_context(api_key))
            self._secrets[(cred_id, sealed)] = secret
        if wallet_id is None:
            wallet_id = reseller_wallet(conn, reseller_id=reseller_id)
        return Caller(cred_id, reseller_id, name, tier_id, secret, int(wallet_id))


_AUTH_AND_NONCE_PG = RawSQL(
    "WITH c AS ("
    "SELECT c.id, c.status, c.sealed_secret, c.reseller_id, r.name, r.status AS r_status, "
    "r.tier_id, a.id AS wallet_id "
    "FROM api_credentials c JOIN resellers r ON r.id = c.reseller_id "
    "LEFT JOIN ledger_accounts a ON a.kind = 'wallet' AND a.owner_type = 'reseller' "
    "AND a.owner_id = r.id AND a.currency = 'CNY' "
    "WHERE c.api_key = :api_key), "
    "n AS (INSERT INTO api_nonces (credential_id, nonce, expires_at) "
    "SELECT id, :nonce, :expires_at FROM c "
    "ON CONFLICT (credential_id, nonce) DO NOTHING RETURNING id) "
    "SELECT c.*, (SELECT count(*) FROM n) FROM c"
)
_INSERT_NONCE = RawSQL(
    "INSERT INTO api_nonces (credential_id, nonce, expires_at) "
    "VALUES (:credential_id, :nonce, :expires_at) "
    "ON CONFLICT (credential_id, nonce) DO NOTHING RETURNING id"
)


def remember_nonce(
    conn: Connection, *, credential_id: int, nonce: str, now: datetime, window_s: int
) -> bool:
    """Record a nonce; False if it was already used (a replay). Never aborts the transaction."""
    row = _INSERT_NONCE.one(
        conn,
        {
            "credential_id": credential_id,
            "nonce": nonce,
            "expires_at": db_time(conn, now + timedelta(seconds=2 * window_s)),
        },
    )
    return row is not None


def prune_nonces(conn: Connection, *, now: datetime) -> int:
    return conn.execute(delete(_nonce).where(_nonce.c.expires_at < now)).rowcount


def reseller_wallet(conn: Connection, *, reseller_id: int) -> int:
    return ledger.wallet_account(conn, owner_type="reseller", owner_id=reseller_id)


def list_resellers(session: Session) -> list[tuple[Reseller, str]]:
    rows = session.execute(
        select(Reseller, Tier.code).join(Tier, Tier.id == Reseller.tier_id).order_by(Reseller.id)
    )
    return [(r, code) for r, code in rows]


def webhook_secrets(conn: Connection, vault: Vault, *, reseller_id: int) -> list[str]:
    """Secrets that sign webhooks to this reseller: those of its active credentials (the
    header carries one signature per secret, so a rotation never drops a delivery)."""
    rows = conn.execute(
        select(_cred.c.api_key, _cred.c.sealed_secret).where(
            _cred.c.reseller_id == reseller_id, _cred.c.status == "active"
        )
    ).all()
    return [vault.unseal(bytes(sealed), _credential_context(key)) for key, sealed in rows]
