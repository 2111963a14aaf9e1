"""Dynamic batching: requests that arrive close together share one forward pass.

Why: on a small model one decode step costs nearly the same for 1 row or 16, so serving many
clients one at a time wastes most of the machine. A single worker thread owns the model; HTTP
handlers (asyncio) submit jobs and read their events. The pending queue is bounded: when it is
full, ``submit`` raises :class:`QueueFullError` and the server answers 503 rather than letting
latency grow without limit.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from bunny.infer.generate import GenerationRequest, GenerationResult, Generator


class QueueFullError(RuntimeError):
    """The pending queue is at its limit."""


@dataclass
class Job:
    """One submitted request and the channel its events come back on.

    Events are ``("text", str)`` deltas (when streaming), then ``("done", GenerationResult)`` or
    ``("error", Exception)``.
    """

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    stream: bool
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    def push(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class DynamicBatcher:
    """Collects jobs for up to ``max_wait_s`` (or until ``max_batch``) and runs them together.

    Jobs with different sampling parameters never share a batch (generate takes one set), so the
    worker takes the oldest job and the pending jobs whose parameters equal it, in arrival order.
    ``max_batch=1`` turns batching off (the baseline of the load benchmark).
    """

    def __init__(self, generator: Generator, max_batch: int = 16, max_wait_s: float = 0.01,
                 max_queue: int = 256) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.generator = generator
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._pending: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self.batches_run = 0
        self.rows_run = 0
        self._thread = threading.Thread(target=self._loop, name="bunny-batcher", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest, stream: bool = False) -> Job:
        job = Job(request=request, loop=asyncio.get_running_loop(), stream=stream)
        with self._cv:
            if self._closed:
                raise RuntimeError("batcher is closed")
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(f"server busy: {len(self._pending)} requests queued (limit {self.max_queue})")
            self._pending.append(job)
            self._cv.notify()
        return job

    @property
    def queued(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=5)

    def _take_batch(self) -> list[Job]:
        with self._cv:
            while not self._pending and not self._closed:
                self._cv.wait()
            if self._closed:
                return []
            deadline = time.monotonic() + self.max_wait_s
            while len(self._pending) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(timeout=left)
            first = self._pending[0]
            batch = [j for j in self._pending if j.request.params == first.request.params][: self.max_batch]
            for j in batch:
                self._pending.remove(j)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                return
            streaming = [j for j in batch if j.stream]

            def on_text(row: int, delta: str, batch: list[Job] = batch) -> None:
                if batch[row].stream:
                    batch[row].push("text", delta)

            try:
                results: list[GenerationResult] = self.generator.generate(
                    [j.request for j in batch], on_text=on_text if streaming else None
                )
            except Exception as exc:  # noqa: BLE001 - every waiting client must hear about it
                for j in batch:
                    j.push("error", exc)
                continue
            self.batches_run += 1
            self.rows_run += len(batch)
            for j, r in zip(batch, results):
                j.push("done", r)
