"""The page's users file: one `user:scrypt$N$r$p$salt$hash` line per user (salt and hash in
base64), comments with `#`. Written by `attune chat-user add FILE USER`; read by users.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import tempfile
from pathlib import Path

# scrypt's cost: 16 MiB and some tens of ms per check, on the server, once per login
N, R, P = 2**14, 8, 1
# a record no password matches in practice, checked for unknown users so they take as long
DECOY = (f"scrypt${N}${R}${P}${base64.b64encode(bytes(16)).decode()}"
         f"${base64.b64encode(bytes(32)).decode()}")


class UsersError(ValueError):
    pass


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    return f"scrypt${N}${R}${P}${_b64(salt)}${_b64(_scrypt(password, salt, N, R, P, 32))}"


def verify_password(password: str, record: str) -> bool:
    _, n, r, p, salt, digest = record.split("$")
    expected = base64.b64decode(digest)
    got = _scrypt(password, base64.b64decode(salt), int(n), int(r), int(p), len(expected))
    return hmac.compare_digest(got, expected)


def read_users_file(path: str | Path) -> dict[str, str]:
    """user -> hash record, in file order; errors name path:line and never echo a line."""
    users = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, _, record = line.strip().partition(":")
        if not (user and _is_record(record)):
            raise UsersError(f"{path}:{number}: not user:scrypt$... (passwords are stored hashed: "
                             "write the line with `attune chat-user add FILE USER`)")
        users[user] = record
    return users


def add_user(path: str | Path, user: str, password: str) -> None:
    """Add `user` to the file (made if absent, readable by its owner only), or set a new password."""
    if not user or ":" in user or user != user.strip():
        raise UsersError("a user name must be non-empty, without ':' or surrounding spaces")
    if not password:
        raise UsersError("empty password")
    path = Path(path)
    lines = path.read_text().splitlines() if path.exists() else []
    entry = f"{user}:{hash_password(password)}"
    out = [line for line in lines if line.strip().partition(":")[0] != user]
    # a known user keeps their place in the file, a new one goes last
    out.insert(next((i for i, line in enumerate(lines) if line.strip().partition(":")[0] == user),
                    len(out)), entry)
    # a new file beside the old, renamed over it: a reader never sees half a file
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(out) + "\n")
    os.replace(tmp, path)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=length,
                          maxmem=2 * 128 * n * r * p)


def _is_record(record: str) -> bool:
    parts = record.split("$")
    return len(parts) == 6 and parts[0] == "scrypt" and all(x.isdigit() for x in parts[1:4])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
