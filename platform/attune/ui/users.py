"""Who may open the page: Gradio login from ATTUNE_CHAT_USERS or ATTUNE_CHAT_USERS_FILE.

    ATTUNE_CHAT_USERS="ada:secret,alan:enigma" attune chat
    ATTUNE_CHAT_USERS_FILE=/etc/attune/chat-users attune chat     # one user:password a line

Neither set: the page is open to anyone who can reach it.
"""

from __future__ import annotations

import os
from pathlib import Path

USERS_ENV = "ATTUNE_CHAT_USERS"
USERS_FILE_ENV = "ATTUNE_CHAT_USERS_FILE"


class UsersError(ValueError):
    pass


def page_users(environ: dict | None = None) -> list[tuple[str, str]] | None:
    """(user, password) pairs for Gradio's `auth`, or None when no login is configured."""
    environ = os.environ if environ is None else environ
    entries = [e for e in environ.get(USERS_ENV, "").split(",") if e.strip()]
    if environ.get(USERS_FILE_ENV):
        lines = Path(environ[USERS_FILE_ENV]).read_text().splitlines()
        entries += [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [_parse(entry) for entry in entries] or None


def _parse(entry: str) -> tuple[str, str]:
    user, sep, password = entry.strip().partition(":")
    if not (sep and user and password):
        # never echo the entry: it may hold a password
        raise UsersError(f"a page user must be written user:password (in {USERS_ENV} or {USERS_FILE_ENV})")
    return user, password
