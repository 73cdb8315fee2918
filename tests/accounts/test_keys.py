"""Key material: format, entropy, hashing."""

from __future__ import annotations

import base64
import hashlib

from mesh.accounts.keys import KEY_LENGTH, generate_key, hash_key, key_prefix, new_id, well_formed


def test_generate_key_format_and_length() -> None:
    key = generate_key()
    assert key.startswith("sk-mesh-")
    assert len(key) == KEY_LENGTH == 51
    assert "=" not in key
    assert len(base64.urlsafe_b64decode(key[len("sk-mesh-") :] + "=")) == 32
    assert well_formed(key)


def test_generate_key_is_random() -> None:
    assert len({generate_key() for _ in range(1000)}) == 1000


def test_hash_key_is_sha256_hex() -> None:
    key = generate_key()
    assert hash_key(key) == hashlib.sha256(key.encode()).hexdigest()
    assert len(hash_key(key)) == 64


def test_key_prefix_is_first_twelve() -> None:
    key = generate_key()
    assert key_prefix(key) == key[:12] and key_prefix(key).startswith("sk-mesh-")


def test_well_formed_rejects_other_text() -> None:
    key = generate_key()
    assert not well_formed(key[:-1])
    assert not well_formed("sk-other" + key[8:])
    assert not well_formed(key[:-1] + "!")
    assert not well_formed("")


def test_new_id_shape() -> None:
    ident = new_id("acct")
    assert ident.startswith("acct_") and len(ident) == 5 + 24
    int(ident[5:], 16)
