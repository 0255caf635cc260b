"""Compare mode: run several answer streams at once and yield all of them as any one grows.

Each stream runs in its own thread so that a slow model never holds back the other panel.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from attune.ui.chat import Reply

_FINISHED = object()


def side_by_side(streams: list[Iterator[Reply]]) -> Iterator[list[Reply]]:
    """Yield the latest Reply of every stream each time one of them moves on."""
    latest = [Reply() for _ in streams]
    updates: queue.Queue = queue.Queue()
    stopping = threading.Event()

    def pump(index: int, stream: Iterator[Reply]) -> None:
        try:
            for reply in stream:
                if stopping.is_set():  # the user pressed Stop or left: drop the connection
                    break
                updates.put((index, reply))
        finally:
            stream.close() if hasattr(stream, "close") else None
            updates.put((index, _FINISHED))

    threads = [threading.Thread(target=pump, args=(i, s), daemon=True) for i, s in enumerate(streams)]
    for thread in threads:
        thread.start()
    running = len(streams)
    try:
        while running:
            index, reply = updates.get()
            if reply is _FINISHED:
                running -= 1
                continue
            latest[index] = reply
            yield list(latest)
    finally:
        stopping.set()
