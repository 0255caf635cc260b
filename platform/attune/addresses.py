"""Whether a listening address is this machine's alone: the API and the chat page are open
without a key or a login only there."""

from __future__ import annotations

import ipaddress

LOOPBACK_NAMES = {"localhost"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
