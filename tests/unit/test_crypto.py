"""Card keys at rest (`security/crypto.py`): envelope encryption bound to where a key lives.

A ciphertext moved to another row, SKU or batch, or read under another master key, must fail
loudly (InvalidTag) instead of revealing a key to the wrong buyer (DESIGN §5.2, §8).
"""

from __future__ import annotations

import hashlib
import os

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from kameng.security.crypto import (
    KEY_SEPARATOR,
    NONCE_BYTES,
    Vault,
    card_key_aad,
    decode_card_key,
    encode_card_key,
)

MASTER = bytes(range(32))
OTHER_MASTER = bytes(range(1, 33))
SKU = 7
OTHER_SKU = 8


@pytest.fixture
def vault() -> Vault:
    return Vault(MASTER)


def _store(vault: Vault, sku_id: int, code: str, secret: str | None) -> tuple[AESGCM, bytes, bytes]:
    """Encrypt a card key the way import does; returns (dek, fingerprint, blob)."""
    aead, _wrapped = vault.new_data_key("batch-1")
    fp = vault.fingerprint(sku_id, code)
    blob = Vault.encrypt_key(aead, sku_id, fp, encode_card_key(code, secret))
    return aead, fp, blob


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_master_key_must_be_32_bytes(length: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Vault(os.urandom(length))


# -- card keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "secret"),
    [
        ("ABCD-EFGH-1234", None),
        ("ABCD-EFGH-1234", "PIN-9876"),
        ("卡号123", "密码456"),
        ("x", ""),
        ("a" * 512, "b" * 512),
    ],
)
def test_card_key_round_trip(vault: Vault, code: str, secret: str | None) -> None:
    aead, fp, blob = _store(vault, SKU, code, secret)
    plain = Vault.decrypt_key(aead, SKU, fp, blob)
    assert decode_card_key(plain) == (code, secret or None)
    # Random ciphertext contains any given short byte string by chance (one byte: ~11 % of
    # blobs), so only texts long enough to mean something are looked for.
    if len(code.encode()) >= 6:
        assert code.encode() not in blob
    if secret and len(secret.encode()) >= 6:
        assert secret.encode() not in blob


def test_blob_layout_is_nonce_then_ciphertext_and_tag(vault: Vault) -> None:
    _, _, blob = _store(vault, SKU, "CODE", None)
    assert len(blob) == NONCE_BYTES + len(b"CODE") + 16


def test_ciphertext_copied_to_another_sku_fails(vault: Vault) -> None:
    aead, fp, blob = _store(vault, SKU, "CODE-1", None)
    with pytest.raises(InvalidTag):
        Vault.decrypt_key(aead, OTHER_SKU, fp, blob)


def test_ciphertext_copied_to_another_row_fails(vault: Vault) -> None:
    """Another row of the same SKU has another fingerprint: the blob must not decrypt there."""
    aead, _fp, blob = _store(vault, SKU, "CODE-1", None)
    other_fp = vault.fingerprint(SKU, "CODE-2")
    with pytest.raises(InvalidTag):
        Vault.decrypt_key(aead, SKU, other_fp, blob)


def test_tampered_blob_fails(vault: Vault) -> None:
    aead, fp, blob = _store(vault, SKU, "CODE-1", "S")
    for index in (0, NONCE_BYTES, len(blob) - 1):
        tampered = bytearray(blob)
        tampered[index] ^= 0x01
        with pytest.raises(InvalidTag):
            Vault.decrypt_key(aead, SKU, fp, bytes(tampered))


def test_another_batch_key_cannot_decrypt(vault: Vault) -> None:
    _aead, fp, blob = _store(vault, SKU, "CODE-1", None)
    other, _ = vault.new_data_key("batch-2")
    with pytest.raises(InvalidTag):
        Vault.decrypt_key(other, SKU, fp, blob)


def test_two_encryptions_of_one_key_differ(vault: Vault) -> None:
    """Fresh nonces: equal keys must not be recognisable from their ciphertexts."""
    aead, _ = vault.new_data_key("batch-1")
    fp = vault.fingerprint(SKU, "SAME")
    first = Vault.encrypt_key(aead, SKU, fp, "SAME")
    second = Vault.encrypt_key(aead, SKU, fp, "SAME")
    assert first != second
    assert first[:NONCE_BYTES] != second[:NONCE_BYTES]
    assert Vault.decrypt_key(aead, SKU, fp, first) == Vault.decrypt_key(aead, SKU, fp, second)


def test_aad_binds_sku_and_fingerprint() -> None:
    fp = b"\x01" * 32
    assert card_key_aad(1, fp) != card_key_aad(2, fp)
    assert card_key_aad(1, fp) != card_key_aad(1, b"\x02" * 32)
    # no ambiguity between "1" + "2..." and "12" + "...": the separator is part of the AAD
    assert card_key_aad(1, b"2" + fp) != card_key_aad(12, fp)


# -- fingerprints -------------------------------------------------------------------------------


def test_fingerprint_stable_across_vault_instances() -> None:
    """Duplicate detection across imports and restarts needs a deterministic fingerprint."""
    assert Vault(MASTER).fingerprint(SKU, "CODE") == Vault(MASTER).fingerprint(SKU, "CODE")
    assert len(Vault(MASTER).fingerprint(SKU, "CODE")) == 32


def test_fingerprint_is_per_sku_and_per_code(vault: Vault) -> None:
    assert vault.fingerprint(SKU, "CODE") != vault.fingerprint(OTHER_SKU, "CODE")
    assert vault.fingerprint(SKU, "CODE") != vault.fingerprint(SKU, "CODE2")
    assert vault.fingerprint(SKU, "CODE") != vault.fingerprint(SKU, "code")
    assert vault.fingerprint(1, "2|x") != vault.fingerprint(12, "|x")


def test_fingerprint_is_keyed_by_master_key() -> None:
    """An unkeyed hash could be brute-forced from a database dump alone."""
    assert Vault(MASTER).fingerprint(SKU, "CODE") != Vault(OTHER_MASTER).fingerprint(SKU, "CODE")
    plain_hashes = {
        hashlib.sha256(b"CODE").digest(),
        hashlib.sha256(f"{SKU}|CODE".encode()).digest(),
    }
    assert Vault(MASTER).fingerprint(SKU, "CODE") not in plain_hashes


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
def test_distinct_codes_have_distinct_fingerprints(a: str, b: str) -> None:
    vault = Vault(MASTER)
    assert (vault.fingerprint(SKU, a) == vault.fingerprint(SKU, b)) is (a == b)


# -- data keys (DEKs) ---------------------------------------------------------------------------


def test_wrapped_dek_unwraps_in_a_new_process() -> None:
    """A new Vault (as after a restart) with the same master key reads old batches."""
    writer = Vault(MASTER)
    aead, wrapped = writer.new_data_key("batch-1")
    fp = writer.fingerprint(SKU, "CODE")
    blob = Vault.encrypt_key(aead, SKU, fp, encode_card_key("CODE", "PIN"))

    reader = Vault(MASTER)
    unwrapped = reader.data_key("batch-1", wrapped)
    assert decode_card_key(Vault.decrypt_key(unwrapped, SKU, fp, blob)) == ("CODE", "PIN")
    assert reader.data_key("batch-1", wrapped) is unwrapped  # cached after the first unwrap


def test_wrapped_dek_does_not_contain_the_dek() -> None:
    vault = Vault(MASTER)
    _aead, wrapped = vault.new_data_key("batch-1")
    assert len(wrapped) == NONCE_BYTES + 32 + 16
    # the same batch uid gets a different DEK each time
    _, wrapped2 = vault.new_data_key("batch-1")
    assert wrapped != wrapped2


def test_wrong_master_key_cannot_unwrap() -> None:
    _, wrapped = Vault(MASTER).new_data_key("batch-1")
    with pytest.raises(InvalidTag):
        Vault(OTHER_MASTER).data_key("batch-1", wrapped)


def test_dek_unwrap_with_another_batch_uid_fails_in_a_fresh_vault() -> None:
    _, wrapped = Vault(MASTER).new_data_key("batch-1")
    with pytest.raises(InvalidTag):
        Vault(MASTER).data_key("batch-2", wrapped)


def test_dek_unwrap_with_another_batch_uid_fails_even_when_cached() -> None:
    """The batch binding must not depend on whether this process has seen the DEK before."""
    vault = Vault(MASTER)
    _, wrapped = vault.new_data_key("batch-1")
    with pytest.raises(InvalidTag):
        vault.data_key("batch-2", wrapped)


def test_truncated_wrapped_dek_fails() -> None:
    vault = Vault(MASTER)
    _, wrapped = Vault(MASTER).new_data_key("batch-1")
    with pytest.raises(InvalidTag):
        vault.data_key("batch-1", wrapped[:-1])


# -- small secrets ------------------------------------------------------------------------------


def test_seal_round_trip(vault: Vault) -> None:
    blob = vault.seal("sk_live_abc", "reseller:1:api_secret")
    assert b"sk_live_abc" not in blob
    assert vault.unseal(blob, "reseller:1:api_secret") == "sk_live_abc"
    assert Vault(MASTER).unseal(blob, "reseller:1:api_secret") == "sk_live_abc"


def test_seal_differs_each_time(vault: Vault) -> None:
    assert vault.seal("x", "ctx") != vault.seal("x", "ctx")


@pytest.mark.parametrize("context", ["reseller:2:api_secret", "reseller:1:webhook_secret", ""])
def test_unseal_with_wrong_context_fails(vault: Vault, context: str) -> None:
    """A secret sealed for reseller 1 must not be usable as reseller 2's secret."""
    blob = vault.seal("sk_live_abc", "reseller:1:api_secret")
    with pytest.raises(InvalidTag):
        vault.unseal(blob, context)


def test_unseal_with_wrong_master_key_fails(vault: Vault) -> None:
    blob = vault.seal("sk_live_abc", "ctx")
    with pytest.raises(InvalidTag):
        Vault(OTHER_MASTER).unseal(blob, "ctx")


def test_sealed_secrets_and_card_keys_use_separate_keys(vault: Vault) -> None:
    """Domain separation: a DEK-wrapping or card-key blob is no sealed secret, and vice versa."""
    _, wrapped = vault.new_data_key("ctx")
    with pytest.raises(InvalidTag):
        vault.unseal(wrapped, "kameng:dek:v1|ctx")


# -- lookup hashes ------------------------------------------------------------------------------


def test_lookup_hash_is_deterministic_and_keyed() -> None:
    a = Vault(MASTER).lookup_hash("K20261126ABCDEFGHJK", "ABCD-EFGH-JKMN-PQRS")
    assert a == Vault(MASTER).lookup_hash("K20261126ABCDEFGHJK", "ABCD-EFGH-JKMN-PQRS")
    assert a != Vault(OTHER_MASTER).lookup_hash("K20261126ABCDEFGHJK", "ABCD-EFGH-JKMN-PQRS")
    assert len(a) == 32


def test_lookup_hash_bound_to_order_number(vault: Vault) -> None:
    """The secret of one order must not open another order."""
    secret = "ABCD-EFGH-JKMN-PQRS"
    assert vault.lookup_hash("K20261126AAAAAAAAAA", secret) != vault.lookup_hash(
        "K20261126AAAAAAAAAB", secret
    )
    assert vault.lookup_hash("K20261126AAAAAAAAAA", secret) != vault.lookup_hash(
        "K20261126AAAAAAAAAA", "ABCD-EFGH-JKMN-PQRT"
    )


def test_lookup_hash_differs_from_fingerprint(vault: Vault) -> None:
    """Separate derived keys: a lookup hash never equals a card-key fingerprint."""
    assert vault.lookup_hash("1", "CODE") != vault.fingerprint(1, "CODE")


# -- encode / decode ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "secret", "encoded"),
    [
        ("CODE", None, "CODE"),
        ("CODE", "", "CODE"),
        ("CODE", "PIN", f"CODE{KEY_SEPARATOR}PIN"),
    ],
)
def test_encode_card_key(code: str, secret: str | None, encoded: str) -> None:
    assert encode_card_key(code, secret) == encoded
    assert decode_card_key(encoded) == (code, secret or None)


@settings(max_examples=200)
@given(
    st.text(min_size=1).filter(lambda s: KEY_SEPARATOR not in s),
    st.one_of(st.none(), st.text(min_size=1).filter(lambda s: KEY_SEPARATOR not in s)),
)
def test_encode_decode_round_trip(code: str, secret: str | None) -> None:
    assert decode_card_key(encode_card_key(code, secret)) == (code, secret)
