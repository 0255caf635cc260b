"""Addresses: whether a listening address is this machine's alone (the API and the chat page are
open without a key or a login only there), and whether anything answers at one.

    check_answers("127.0.0.1", 6379, "RAY_ADDRESS=127.0.0.1:6379", "no Ray cluster")
"""

from __future__ import annotations

import ipaddress
import socket

from attune.config import ConfigError

LOOPBACK_NAMES = {"localhost"}
# Long enough for a far server to accept a connection, short next to clients' minutes of retries.
CONNECT_TIMEOUT_S = 5.0


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_answers(host: str, port: int, key: str, what: str, hint: str = "") -> None:
    """A ConfigError, in seconds, where nothing accepts a connection at host:port: `key` is the
    setting that named the address, `what` the server missing there."""
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise ConfigError(f"{key}: {what} answers at {host}:{port} ({reason}){hint}") from None
