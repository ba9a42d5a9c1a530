"""Encryption at rest (optional, off by default): message content sealed with AES-256-GCM.

Keys come from a file (``--encryption-key-file``) or ``$IM_ENCRYPTION_KEY``: one
key per line, ``ID:BASE64`` (32 random bytes; ``python -m backend keygen`` makes
one). The first line is the key new messages are written with; the others are
kept to read older rows, so keys rotate by putting a new line first. Each row
records its key id; the nonce is random per message (96 bits, as NIST SP
800-38D recommends) and the additional data binds the ciphertext to its
sender, receiver and msg_id, so a row's content cannot be moved to another row.
"""

from __future__ import annotations

import base64
import os
import secrets
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.exceptions import InvalidTag

NONCE_BYTES = 12  # GCM's standard 96-bit nonce (NIST SP 800-38D)
KEY_BYTES = 32  # AES-256
# Checked on start: this constant sealed with each key lives in the key_check table,
# so a wrong key is refused before it can write a row no one can read.
PROBE = b"im-backend key check v1"


class KeyError_(ValueError):
    """A key ring that cannot be used: malformed, or not the key the database was written with."""


@dataclass(frozen=True)
class KeyRing:
    keys: dict[str, bytes]
    current: str

    def seal(self, plaintext: str, aad: bytes) -> tuple[str, str]:
        """Returns (key id, base64 of nonce + ciphertext)."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        ct = AESGCM(self.keys[self.current]).encrypt(nonce, plaintext.encode("utf-8"), aad)
        return self.current, base64.b64encode(nonce + ct).decode("ascii")

    def open(self, key_id: str, sealed: str, aad: bytes) -> str:
        key = self.keys.get(key_id)
        if key is None:
            raise KeyError_(f"no key with id {key_id!r} in the key ring")
        raw = base64.b64decode(sealed)
        return AESGCM(key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], aad).decode("utf-8")

    def probe(self, key_id: str) -> str:
        return self.seal_with(key_id, PROBE)

    def seal_with(self, key_id: str, data: bytes) -> str:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return base64.b64encode(nonce + AESGCM(self.keys[key_id]).encrypt(nonce, data, b"probe")).decode("ascii")

    def check(self, key_id: str, sealed_probe: str) -> bool:
        raw = base64.b64decode(sealed_probe)
        try:
            return AESGCM(self.keys[key_id]).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], b"probe") == PROBE
        except InvalidTag:
            return False


def parse_key_ring(text: str) -> KeyRing:
    keys: dict[str, bytes] = {}
    order: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key_id, sep, b64 = line.partition(":")
        if not sep or not key_id or len(key_id) > 16:
            raise KeyError_(f"key line {n}: expected ID:BASE64 with an id of 1-16 characters")
        try:
            key = base64.b64decode(b64, validate=True)
        except ValueError:
            raise KeyError_(f"key line {n}: the key is not base64") from None
        if len(key) != KEY_BYTES:
            raise KeyError_(f"key line {n}: a key is {KEY_BYTES} bytes (AES-256), this one is {len(key)}")
        if key_id in keys:
            raise KeyError_(f"key line {n}: key id {key_id!r} appears twice")
        keys[key_id] = key
        order.append(key_id)
    if not keys:
        raise KeyError_("the key ring is empty")
    return KeyRing(keys, order[0])


def load_key_ring(path: str | None, env_value: str | None = None) -> KeyRing | None:
    """From a file if given, else from the environment value; None when neither is set (encryption off)."""
    if path:
        with open(path, encoding="utf-8") as f:
            return parse_key_ring(f.read())
    if env_value:
        return parse_key_ring(env_value.replace(";", "\n"))
    return None


def new_key_line(key_id: str = "k1") -> str:
    return f"{key_id}:{base64.b64encode(os.urandom(KEY_BYTES)).decode('ascii')}"
