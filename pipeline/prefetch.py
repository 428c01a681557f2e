"""The one thread hand-off of the data path: an iterator run ahead in a thread, through a bounded queue.

Used wherever Python work (tar streaming, S3 reads) should overlap the consumer: the reader's
parallel partition streams (:func:`lockstep`) and the loader's feed of raw batches into DALI.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")
_END = object()


class _Failure:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetcher(Generic[T]):
    """Runs ``source`` in a daemon thread, at most ``depth`` items ahead of the consumer.

    ``get()`` returns the next item; at the end it raises ``StopIteration`` (again at every later
    call), after a failure of the source its exception (again at every later call), after ``close()``
    ``StopIteration``. A producer thread that dies without a word is an error, not a hang; ``get``
    with a ``timeout`` raises ``TimeoutError`` when no item arrives in time. ``exhausted`` is set once
    the source has ended or failed. ``close()`` stops the thread and closes the source (in the
    producer thread, between two items: a generator's ``finally`` blocks run there).
    """

    def __init__(self, source: Iterable[T], depth: int = 2, name: str = "prefetch") -> None:
        self._source = iter(source)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self.exhausted = threading.Event()
        self.error: BaseException | None = None
        """The source's exception, once it failed."""
        self._last: Any = None  # _END or a _Failure once seen: answered again at every get()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False  # the consumer is gone

    def _run(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
            self.exhausted.set()
            self._put(_END)
        except BaseException as e:  # handed to the consumer, which re-raises it
            self.error = e
            self.exhausted.set()
            self._put(_Failure(e))
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):  # best effort: the source's own cleanup
                    close()

    def get(self, timeout: float | None = None) -> T:
        if self._last is None:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                try:
                    item = self._queue.get(timeout=0.1)
                    break
                except queue.Empty:
                    if self._stop.is_set():
                        raise StopIteration from None
                    if not self._thread.is_alive() and self._queue.empty():
                        raise RuntimeError(f"{self._thread.name} stopped without finishing") from None
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(f"{self._thread.name}: no item within {timeout:.0f} s") from None
            if item is not _END and not isinstance(item, _Failure):
                return item
            self._last = item
        if isinstance(self._last, _Failure):
            raise self._last.error
        raise StopIteration

    def __iter__(self) -> Iterator[T]:
        while True:
            try:
                yield self.get()
            except StopIteration:
                return

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout=timeout)


def lockstep(sources: list[Iterable[T]], depth: int = 2, name: str = "reader") -> Iterator[tuple[T, ...]]:
    """One item of every source at a time, as a tuple in source order; each source runs ahead in its
    own :class:`Prefetcher`. Ends when a source ends."""
    prefetchers = [Prefetcher(s, depth, f"{name}-{w}") for w, s in enumerate(sources)]
    try:
        while True:
            try:
                items = tuple([p.get() for p in prefetchers])
            except StopIteration:
                return
            yield items
    finally:
        for p in prefetchers:
            p.close(timeout=5)
