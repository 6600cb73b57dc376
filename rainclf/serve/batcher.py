"""Dynamic micro-batching: images of concurrent requests gathered into ONE onnxruntime call.

Each request's decoded images (their pixel rows, ``(patches_per_image, patch_dim)`` float32
each) wait in one queue. The batcher task takes up to ``max_batch`` of them, waiting at most
``max_wait_s`` after the oldest one arrived for others to join, runs them as one call on a
dedicated thread (onnxruntime releases the GIL, so the event loop keeps parsing requests), and
answers every image's future separately, so each request gets its own rows back in order.

Admission is counted in images, not requests, from the moment a request's parts are known until
its answer is computed (decoding included): ``admit(n)`` refuses once ``max_queue`` would be
passed, which the app turns into 503 + Retry-After, so memory stays bounded under any load.
Everything but ``infer`` runs on the event loop thread: no locks.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class ShuttingDown(RuntimeError):
    """The batcher was closed before this image ran."""


class MicroBatcher:
    def __init__(self, infer: Callable[[np.ndarray], np.ndarray], max_batch: int, max_wait_s: float,
                 max_queue: int, on_batch: Callable[[int, float], None] = lambda n, seconds: None,
                 on_depth: Callable[[int], None] = lambda depth: None):
        self.infer, self.max_batch, self.max_wait_s, self.max_queue = infer, max_batch, max_wait_s, max_queue
        self.on_batch, self.on_depth = on_batch, on_depth
        self.admitted = 0                      # images admitted and not yet answered
        self._pending: deque = deque()         # (rows, future, arrival time)
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="rainclf-onnx")
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------------ admission
    def admit(self, n: int) -> bool:
        if self.admitted + n > self.max_queue:
            return False
        self.admitted += n
        self.on_depth(self.admitted)
        return True

    def release(self, n: int) -> None:
        self.admitted -= n
        self.on_depth(self.admitted)

    @property
    def full(self) -> bool:
        return self.admitted >= self.max_queue

    # ------------------------------------------------------------------ requests
    async def p_rain(self, rows: Sequence[np.ndarray]) -> list[float]:
        """p_rain for each image's rows, in order (the images must have been admitted)."""
        if self._task is None or self._task.done():
            raise ShuttingDown("the server is shutting down")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in rows]
        now = loop.time()
        self._pending.extend((r, f, now) for r, f in zip(rows, futures))
        self._wake.set()
        return list(await asyncio.gather(*futures))

    # ------------------------------------------------------------------ the batcher task
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="rainclf-batcher")

    async def close(self) -> None:
        """Stop (uvicorn calls this after the requests in flight were answered); anything still
        queued is answered with ShuttingDown."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._pending:
            _, f, _ = self._pending.popleft()
            if not f.done():
                f.set_exception(ShuttingDown("the server is shutting down"))
        self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            # the oldest image decides the deadline: no image waits longer than max_wait_s for company
            deadline = self._pending[0][2] + self.max_wait_s
            while len(self._pending) < self.max_batch and (left := deadline - loop.time()) > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:   # an alias of TimeoutError from Python 3.11
                    break
            batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
            batch = [(r, f) for r, f, _ in batch if not f.done()]    # a cancelled request drops out
            if batch:
                await self._run_batch(loop, batch)

    async def _run_batch(self, loop, batch: list) -> None:
        t = time.perf_counter()
        try:
            # concatenating is a copy of B × 1.2 MB (224 px): done on the inference thread as well
            p = await loop.run_in_executor(self._executor, self._infer_rows, [r for r, _ in batch])
        except Exception as e:   # noqa: BLE001 — every waiting request must hear about it
            for _, f in batch:
                if not f.done():
                    f.set_exception(e)
            return
        self.on_batch(len(batch), time.perf_counter() - t)
        for (_, f), pi in zip(batch, p):
            if not f.done():
                f.set_result(float(pi))

    def _infer_rows(self, rows: list[np.ndarray]) -> np.ndarray:
        p = np.asarray(self.infer(np.concatenate(rows)))
        if p.shape != (len(rows),):
            raise RuntimeError(f"the image graph returned p_rain of shape {p.shape} for {len(rows)} images")
        return p
