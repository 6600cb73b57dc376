"""Ordered, bounded prefetch: run ``fn`` on the next items in worker threads while the caller
works on the current one (image decoding and resizing overlapping the model's forward pass).

PIL's JPEG/PNG decoders and its resize release the GIL, so one or two threads overlap them with
torch's compute even on a 2-core machine. At most ``depth`` results are in flight or waiting, so
memory stays bounded (``depth`` batches of decoded images); results come back in input order.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")
DEFAULT_DEPTH = 2


def default_workers() -> int:
    return max(1, min(2, (os.cpu_count() or 1) - 1))


def prefetched(items: Iterable[T], fn: Callable[[T], R], depth: int = DEFAULT_DEPTH,
               workers: int | None = None) -> Iterator[R]:
    """``fn(item)`` for every item, in order; up to ``depth`` computed ahead (``depth`` 0: inline,
    no threads). An exception in ``fn`` is raised where its result would have been yielded."""
    if depth <= 0:
        for item in items:
            yield fn(item)
        return
    it = iter(items)
    with ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="rainclf-decode") as pool:
        pending: deque = deque()
        try:
            for item in it:
                pending.append(pool.submit(fn, item))
                if len(pending) >= depth:
                    break
            while pending:
                result = pending.popleft().result()
                nxt = next(it, _END)
                if nxt is not _END:
                    pending.append(pool.submit(fn, nxt))
                yield result
        finally:
            for f in pending:      # the caller stopped early (error, interrupt): drop the rest
                f.cancel()


_END = object()
