"""A throwaway PostgreSQL server for the tests: initdb in a temporary directory, loopback only.

    python tests/postgres.py      # starts one, prints its URL; Ctrl-C stops it and removes it all

Debian's `postgresql` package provides the binaries (.ci/run installs it). As root the server
runs as `nobody`: initdb and postgres refuse to run as root.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)  # newest first
SUPERUSER = "attune"


def binary(name: str) -> str:
    for folder in BIN_DIRS:
        if (folder / name).is_file():
            return str(folder / name)
    if found := shutil.which(name):
        return found
    raise FileNotFoundError(f"{name} not found: install PostgreSQL (apt-get install postgresql)")


class Postgres:
    """One server: start(), url(database), create_database(), stop() (and start() again), close()."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="attune-pg-"))
        self.data, self.sockets = self.root / "data", self.root / "run"
        self.sockets.mkdir()
        self.user = "nobody" if os.geteuid() == 0 else None
        if self.user:
            account = pwd.getpwnam(self.user)
            for path in (self.root, self.sockets):
                os.chown(path, account.pw_uid, account.pw_gid)
        self.port = _free_port()
        self.process: subprocess.Popen | None = None
        try:
            subprocess.run([binary("initdb"), "-D", str(self.data), "-U", SUPERUSER,
                            "--auth=trust", "--encoding=UTF8", "--no-sync"],
                           check=True, capture_output=True, user=self.user, timeout=120)
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def start(self, timeout_s: float = 60) -> None:
        """Start the server and return once it takes connections (polled, never a fixed sleep)."""
        with open(self.root / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                [binary("postgres"), "-D", str(self.data), "-p", str(self.port),
                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.sockets}",
                 "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "synchronous_commit=off"],
                user=self.user, stdout=subprocess.DEVNULL, stderr=log)
        try:
            self._wait_until_ready(timeout_s)
        except BaseException:  # a server that does not answer is not left running
            self.stop()
            raise

    def _wait_until_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                psycopg.connect(self.url("postgres", "postgresql"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"PostgreSQL did not answer in {timeout_s:.0f} s: "
                                       f"{(self.root / 'server.log').read_text()[-2000:]}")
            try:  # the interval between polls, which also notices a server that exited
                code = self.process.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                continue
            raise RuntimeError(f"PostgreSQL exited ({code}): "
                               f"{(self.root / 'server.log').read_text()[-2000:]}")

    def url(self, database: str, driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url("postgres", "postgresql"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """Fast shutdown: open sessions are ended, the server's processes exit with it."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    # Ctrl-C, or a kill of a background run (where the shell leaves SIGINT ignored), cleans up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    server = Postgres()
    try:
        server.start()
        print(f"ATTUNE_FEEDBACK_DB={server.url('postgres', 'postgresql')}  (Ctrl-C to stop)", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
