"""Batches placed on the devices ahead of the step that reads them.

    batches = DevicePrefetcher(host_iterator, place=lambda b: sharding.shard_batch(b, mesh))
    batch = next(batches)            # already on the devices, sharded as the step wants it
    batches.wait_seconds             # total time `next` has blocked: the input-wait clock

A background thread takes host batches (numpy) from the iterator, places them with `place` (the
host-to-device copies start there, asynchronously) and keeps up to `size` placed batches ready, so
the copies of the next batches overlap the running step. The order of the batches is the
iterator's: a resumed run reads the same stream. An exception in the iterator or in `place` is
raised by the `next` that would have returned that batch; the iterator's end ends this one.

A stalled input never hangs silently: while `next` waits longer than `stall_warning_s`, it logs a
warning every `stall_warning_s` seconds saying how long it has waited.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

_DONE = object()  # the iterator ended
_POLL_S = 0.1  # how often a blocked producer looks at the stop flag


class DevicePrefetcher:
    """An iterator over `place(batch)` for the batches of `iterator`, up to `size` ahead."""

    def __init__(self, iterator: Iterator[Any], place: Callable[[Any], Any], size: int = 2,
                 stall_warning_s: float = 60.0):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self._iterator = iterator
        self._place = place
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._stall_warning_s = float(stall_warning_s)
        self._finished = False
        self.wait_seconds = 0.0
        self._thread = threading.Thread(target=self._produce, name="device-prefetch",
                                        daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for batch in self._iterator:
                if not self._put((self._place(batch), None)):
                    return
            self._put((_DONE, None))
        except BaseException as e:  # handed to the consumer, raised by its `next`
            self._put((None, e))

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        t0 = time.perf_counter()
        try:
            while True:
                try:
                    item, error = self._queue.get(timeout=self._stall_warning_s)
                    break
                except queue.Empty:
                    log.warning("no input batch for %.0f s: the input pipeline is stalled or "
                                "far slower than the step (see the input wait in the log)",
                                time.perf_counter() - t0)
        finally:
            self.wait_seconds += time.perf_counter() - t0
        if error is not None:
            self._finished = True
            raise error
        if item is _DONE:
            self._finished = True
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the thread (it finishes the batch it is placing) and drop the ready batches."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10.0)

    def __enter__(self) -> DevicePrefetcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
