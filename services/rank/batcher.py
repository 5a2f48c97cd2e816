"""Dynamic micro-batching across concurrent requests (the Triton / Ray Serve knobs).

Two settings: `max_batch` (candidates per model call) and `max_delay_us` (how long the first
request of a batch may wait for company). A worker thread takes the first waiting request,
then keeps collecting until the batch would pass `max_batch` or the delay since that first
request is spent, and runs them all in one call. A request never waits longer than the delay
for a batch to fill, and one larger than `max_batch` runs alone.

Why on by default on GPU only: on a GPU one call over 2,000 candidates costs about what a call
over 200 does (launch-bound), so batching multiplies throughput; on a CPU the work is linear
in candidates, so waiting for company only adds latency.

Every result carries its queue time (submit -> batch start) and compute time (the batch's
model call), which the app reports apart, as the two call for different fixes.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class BatchSettings:
    """`max_batch`: candidates per model call; `max_delay_us`: the longest a batch waits."""

    enabled: bool = False
    max_batch: int = 4096
    max_delay_us: int = 500

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_delay_us < 0:
            raise ValueError("batching: max_batch must be >= 1 and max_delay_us >= 0")


@dataclass(frozen=True)
class Timed(Generic[Result]):
    """A batched result with where its time went."""

    value: Result
    queue_s: float
    compute_s: float
    batch_size: int  # candidates in the model call that produced it


@dataclass
class _Pending(Generic[Item, Result]):
    item: Item
    size: int
    submitted: float
    future: Future


class MicroBatcher(Generic[Item, Result]):
    """Runs `run(items) -> results` (same order) on batches of concurrently submitted items."""

    def __init__(self, run: Callable[[list[Item]], list[Result]], settings: BatchSettings,
                 on_batch: Callable[[int, int], None] | None = None,
                 name: str = "micro-batcher") -> None:
        self._run = run
        self.settings = settings
        self._on_batch = on_batch  # (candidates, requests) per model call, for metrics
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._carry: _Pending | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: Item, size: int) -> Future:
        """Queue one request of `size` candidates; the future yields a `Timed` result."""
        if self._closed:
            raise RuntimeError("batcher is closed")
        future: Future = Future()
        self._queue.put(_Pending(item, max(1, int(size)), time.perf_counter(), future))
        return future

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _collect(self) -> list[_Pending] | None:
        first = self._carry or self._queue.get()
        self._carry = None
        if first is None:
            return None
        batch, total = [first], first.size
        deadline = first.submitted + self.settings.max_delay_us / 1e6
        while total < self.settings.max_batch:
            wait = deadline - time.perf_counter()
            try:
                nxt = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                self._queue.put(None)  # stop after this batch
                break
            if total + nxt.size > self.settings.max_batch:
                self._carry = nxt  # starts the next batch
                break
            batch.append(nxt)
            total += nxt.size
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            started = time.perf_counter()
            try:
                results = self._run([p.item for p in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch run returned {len(results)} results for "
                                       f"{len(batch)} requests")
            except BaseException as exc:  # every waiter gets the error, the loop lives on
                for p in batch:
                    p.future.set_exception(exc)
                continue
            compute = time.perf_counter() - started
            size = sum(p.size for p in batch)
            if self._on_batch is not None:
                self._on_batch(size, len(batch))
            for p, value in zip(batch, results, strict=True):
                p.future.set_result(Timed(value, started - p.submitted, compute, size))
