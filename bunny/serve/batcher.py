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
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from bunny.infer.generate import GenerationRequest, GenerationResult, Generator

logger = logging.getLogger("bunny.serve")


class QueueFullError(RuntimeError):
    """The pending queue is at its limit."""


@dataclass
class Job:
    """One submitted request and the channel its events come back on.

    Events are ``("text", str)`` deltas (when streaming), then ``("done", GenerationResult)`` or
    ``("error", Exception)``. ``cancel()`` (the client went away) drops the job if it is still
    queued and ends its row early if it is running.
    """

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    stream: bool
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    def push(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    def cancel(self) -> None:
        self.cancelled = True


class DynamicBatcher:
    """Collects jobs for up to ``max_wait_s`` after the oldest arrived (or until ``max_batch``
    compatible ones wait) and runs them as one batch.

    Jobs whose sampling parameters cannot share logits processors never share a batch
    (:meth:`SamplingParams.batch_key`), so the worker takes the oldest job and the pending jobs
    compatible with it, in arrival order. ``max_batch=1`` turns batching off (the baseline of
    the load benchmark).
    """

    def __init__(self, generator: Generator, max_batch: int = 16, max_wait_s: float = 0.01,
                 max_queue: int = 256) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.generator = generator
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._pending: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self.batches_run = 0
        self.rows_run = 0
        self.busy = False
        self._thread = threading.Thread(target=self._loop, name="bunny-batcher", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest, stream: bool = False) -> Job:
        """Queue ``request`` (call from the event loop that will read the job's events)."""
        job = Job(request=request, loop=asyncio.get_running_loop(), stream=stream)
        with self._cv:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(f"server busy: {len(self._pending)} requests queued (limit {self.max_queue}); "
                                     "retry later")
            self._pending.append(job)
            self._cv.notify()
        return job

    @property
    def queued(self) -> int:
        return len(self._pending)

    def stats(self) -> dict[str, Any]:
        return {"queued": self.queued, "busy": self.busy, "batches_run": self.batches_run,
                "rows_run": self.rows_run, "max_batch": self.max_batch, "max_queue": self.max_queue}

    def close(self) -> None:
        """Stop the worker after its current batch; queued jobs get an error event."""
        with self._cv:
            self._closed = True
            pending, self._pending = list(self._pending), collections.deque()
            self._cv.notify_all()
        for job in pending:
            job.push("error", RuntimeError("the server is shutting down"))
        self._thread.join(timeout=30)

    def _compatible(self, first: Job) -> list[Job]:
        key = first.request.params.batch_key()
        if key is None or self.max_batch == 1:
            return [first]
        return [j for j in self._pending if j.request.params.batch_key() == key][: self.max_batch]

    def _take_batch(self) -> list[Job]:
        """Block until a batch is due; [] when closed. A batch is due when ``max_batch``
        compatible jobs wait or the oldest job has waited ``max_wait_s``."""
        with self._cv:
            while True:
                while self._pending and self._pending[0].cancelled:
                    self._pending.popleft()
                if self._closed:
                    return []
                if not self._pending:
                    self._cv.wait()
                    continue
                first = self._pending[0]
                batch = self._compatible(first)
                left = first.submitted + self.max_wait_s - time.monotonic()
                if len(batch) < self.max_batch and left > 0:
                    self._cv.wait(timeout=left)
                    continue
                for j in batch:
                    self._pending.remove(j)
                batch = [j for j in batch if not j.cancelled]
                if batch:
                    self.busy = True
                    return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                return

            def on_text(row: int, delta: str, batch: list[Job] = batch) -> None:
                if batch[row].stream:
                    batch[row].push("text", delta)

            try:
                results: list[GenerationResult] = self.generator.generate(
                    [j.request for j in batch],
                    on_text=on_text if any(j.stream for j in batch) else None,
                    cancelled=lambda row, batch=batch: batch[row].cancelled,
                )
            except Exception as exc:  # noqa: BLE001 - every waiting client must hear about it
                logger.exception("a batch of %d request(s) failed", len(batch))
                for j in batch:
                    j.push("error", exc)
                continue
            finally:
                self.busy = False
            self.batches_run += 1
            self.rows_run += len(batch)
            for j, r in zip(batch, results):
                j.push("done", r)
