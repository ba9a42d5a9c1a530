"""User accounts for the embedded broker: salted scrypt hashes, constant-time checks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from . import protocol
from .store import User, now_ms

# scrypt cost: N=2^14, r=8, p=1 is Percival's recommendation for interactive logins (< 100 ms, 16 MiB).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SALT_BYTES = 16  # NIST SP 800-132 asks for at least 128 bits of salt.
# The username the worker inside `serve` uses: ':' can never appear in a uid, so no user can take it.
WORKER_USERNAME = "worker:internal"


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    salt = secrets.token_bytes(SALT_BYTES)
    dk = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=256 * 1024 * 1024, dklen=32)
    b64 = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
    return f"scrypt${n}${r}${p}${b64(salt)}${b64(dk)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, dk = stored.split("$")
        if scheme != "scrypt":
            return False
        want = base64.b64decode(dk)
        got = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             maxmem=256 * 1024 * 1024, dklen=len(want))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


# A hash of nothing, checked for unknown users so that "no such user" costs as long as "wrong password".
_DUMMY_HASH = hash_password(secrets.token_hex(8))


def authenticate(uid: str, password: str) -> bool:
    user = User.get_or_none(User.uid == uid) if protocol.valid_uid(uid) else None
    if user is None:
        verify_password(password, _DUMMY_HASH)
        return False
    return verify_password(password, user.password_hash)


def add_user(uid: str, password: str) -> bool:
    """Add the account ``uid``, or set its password if it exists. True: a new account; False: a password changed.
    Raises ValueError for an invalid uid or an empty password."""
    if not protocol.valid_uid(uid):
        raise ValueError("a uid is 1-50 characters of A-Z a-z 0-9 _ . -")
    if not password:
        raise ValueError("the password must not be empty")
    hashed = hash_password(password)
    with User._meta.database.atomic():
        if User.update(password_hash=hashed).where(User.uid == uid).execute():
            return False
        User.create(uid=uid, password_hash=hashed, created_at=now_ms())
        return True


def remove_user(uid: str) -> bool:
    return User.delete().where(User.uid == uid).execute() > 0


def list_users() -> list[str]:
    return [u.uid for u in User.select(User.uid).order_by(User.uid)]
