"""Card keys at rest: AES-256-GCM envelope encryption and keyed fingerprints.

* The master key (KEK) lives outside the database (env or a 0600 file in the data dir).
* Each stock batch gets its own data key (DEK), stored wrapped by the KEK; rotating the KEK
  re-wraps DEKs and never touches the keys themselves.
* A card key's associated data is (SKU id, fingerprint); the fingerprint is unique per SKU, so
  a ciphertext copied onto another row or SKU fails to decrypt instead of revealing a key.
* The fingerprint is HMAC-SHA256 under a key derived from the KEK: duplicates are found without
  storing anything that could be reversed or brute-forced offline from a database dump alone.
"""

from __future__ import annotations

import hmac
import os
import threading

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

NONCE_BYTES = 12
KEY_SEPARATOR = "\x1f"


def _derive(master_key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master_key)


def card_key_aad(sku_id: int, fingerprint: bytes) -> bytes:
    return b"kameng:ck:v1|" + str(sku_id).encode() + b"|" + fingerprint


def encode_card_key(code: str, secret: str | None) -> str:
    return code if not secret else f"{code}{KEY_SEPARATOR}{secret}"


def decode_card_key(plaintext: str) -> tuple[str, str | None]:
    code, sep, secret = plaintext.partition(KEY_SEPARATOR)
    return code, (secret if sep else None)


class Vault:
    """All symmetric crypto the platform does, keyed from one master key."""

    def __init__(self, master_key: bytes) -> None:
        if len(master_key) != 32:
            raise ValueError("master key must be 32 bytes")
        self._kek = AESGCM(master_key)
        self._fingerprint_key = _derive(master_key, b"kameng fingerprint v1")
        self._secrets = AESGCM(_derive(master_key, b"kameng secrets v1"))
        self._lookup_key = _derive(master_key, b"kameng lookup v1")
        self._dek_cache: dict[tuple[str, bytes], AESGCM] = {}
        self._lock = threading.Lock()

    # -- card keys --------------------------------------------------------------------------
    def fingerprint(self, sku_id: int, code: str) -> bytes:
        message = str(sku_id).encode() + b"|" + code.encode()
        return hmac.digest(self._fingerprint_key, message, "sha256")

    def new_data_key(self, batch_uid: str) -> tuple[AESGCM, bytes]:
        """A fresh DEK for one batch and its KEK-wrapped form for the database."""
        dek = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(NONCE_BYTES)
        wrapped = nonce + self._kek.encrypt(nonce, dek, b"kameng:dek:v1|" + batch_uid.encode())
        aead = AESGCM(dek)
        with self._lock:
            self._dek_cache[(batch_uid, wrapped)] = aead
        return aead, wrapped

    def data_key(self, batch_uid: str, wrapped: bytes) -> AESGCM:
        cached = self._dek_cache.get((batch_uid, wrapped))
        if cached is not None:
            return cached
        dek = self._kek.decrypt(
            wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], b"kameng:dek:v1|" + batch_uid.encode()
        )
        aead = AESGCM(dek)
        with self._lock:
            self._dek_cache[(batch_uid, wrapped)] = aead
        return aead

    @staticmethod
    def encrypt_key(aead: AESGCM, sku_id: int, fingerprint: bytes, plaintext: str) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + aead.encrypt(nonce, plaintext.encode(), card_key_aad(sku_id, fingerprint))

    @staticmethod
    def decrypt_key(aead: AESGCM, sku_id: int, fingerprint: bytes, blob: bytes) -> str:
        plain = aead.decrypt(
            blob[:NONCE_BYTES], blob[NONCE_BYTES:], card_key_aad(sku_id, fingerprint)
        )
        return plain.decode()

    # -- small secrets (API secrets, webhook secrets) ----------------------------------------
    def seal(self, plaintext: str, context: str) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._secrets.encrypt(nonce, plaintext.encode(), context.encode())

    def unseal(self, blob: bytes, context: str) -> str:
        return self._secrets.decrypt(
            blob[:NONCE_BYTES], blob[NONCE_BYTES:], context.encode()
        ).decode()

    # -- lookup secrets -----------------------------------------------------------------------
    def lookup_hash(self, order_no: str, secret: str) -> bytes:
        """Keyed hash of a buyer's lookup secret; bound to the order number."""
        return hmac.digest(self._lookup_key, f"{order_no}|{secret}".encode(), "sha256")
