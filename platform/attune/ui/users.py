"""Who may open the page: a Gradio login against a users file of salted hashes, or plaintext
users from ATTUNE_CHAT_USERS for quick local use.

    attune chat-user add chat-users ada                       # writes ada:scrypt$... (passwords.py)
    attune chat --host 0.0.0.0 --users-file chat-users        # or ATTUNE_CHAT_USERS_FILE=chat-users
    ATTUNE_CHAT_USERS="ada:secret,alan:enigma" attune chat    # plaintext, on a laptop

The page calls the API with the server's key, so an open page lends that key to every visitor:
with no user configured it starts on a loopback address only, unless its config says
`auth: none` (the API's rule for its own keys).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from attune.addresses import is_loopback
from attune.ui.passwords import DECOY, UsersError, read_users_file, verify_password

USERS_ENV = "ATTUNE_CHAT_USERS"
USERS_FILE_ENV = "ATTUNE_CHAT_USERS_FILE"

log = logging.getLogger(__name__)
Login = Callable[[str, str], Awaitable[bool]]


def page_login(auth: str, host: str, users_file: str | Path | None = None,
               environ: dict | None = None) -> Login | None:
    """Gradio's `auth` for a page listening on `host`: a check of user and password, or None
    for an open page. Raises UsersError for an open page off loopback that `auth` does not allow."""
    if auth == "none":
        return None
    environ = os.environ if environ is None else environ
    plain = dict(_parse(e) for e in environ.get(USERS_ENV, "").split(",") if e.strip())
    users_file = users_file or environ.get(USERS_FILE_ENV) or None
    if users_file:
        read_users_file(users_file)  # a missing or malformed file fails at start, not at a login
    elif not plain:
        if is_loopback(host):
            return None
        raise UsersError(f"the chat page listens on {host} with no login, and calls the API with the "
                         "server's key for anyone who reaches it: add users (`attune chat-user add "
                         "FILE USER`, then `--users-file FILE`, `users_file: FILE` in the app's args, "
                         f"or {USERS_FILE_ENV}), or serve it open on purpose (`--auth none` for "
                         "`attune chat`, `auth: none` in the app's args)")
    return _check(plain, users_file)


def _check(plain: dict[str, str], users_file: str | Path | None) -> Login:
    def check(user: str, password: str) -> bool:
        if user in plain:
            return hmac.compare_digest(password.encode(), plain[user].encode())
        try:  # read at every login: a changed file (a rotated Secret) counts without a restart
            hashed = read_users_file(users_file) if users_file else {}
            # an unknown user costs the same hashing as a known one: the time tells nothing
            return verify_password(password, hashed.get(user, DECOY)) and user in hashed
        except (OSError, ValueError) as e:  # a file broken since start: nobody in until it is fixed
            log.warning("chat page login refused: %s", e)
            return False

    async def login(user: str, password: str) -> bool:
        # scrypt takes tens of ms: off the event loop that streams everyone's answers
        return await asyncio.to_thread(check, user, password)

    return login


def _parse(entry: str) -> tuple[str, str]:
    user, sep, password = entry.strip().partition(":")
    if not (sep and user and password):
        # never echo the entry: it may hold a password
        raise UsersError(f"a page user in {USERS_ENV} must be written user:password")
    return user, password
