"""The dynamic batcher: coalesces concurrent requests into one predictor call. It knows nothing of
HTTP: it raises `Overloaded`, `TimedOut`, `NotAccepting`, `Refused` and `Failed`, and the app
maps them to 503, 504, 503, 422 and 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from bertedge.edges.serve.config import ServeConfig
from bertedge.edges.serve.metrics import Metrics
from bertedge.edges.serve.protocol import PredictorLike
from bertedge.errors import BertedgeError
from bertedge.runtime.predictor import INFERENCE_FAILED
from bertedge.runtime.records import Pair
from bertedge.runtime.tasks import Result

log = logging.getLogger("uvicorn.error")  # uvicorn configures this one: our lines join its log


class BatchError(Exception):
    """Why a request got no predictions; `retry_after` (seconds) when retrying later may help."""

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message, self.retry_after = message, retry_after


class NotAccepting(BatchError):
    """Starting, shutting down, or the worker crashed while it held the request."""


class Overloaded(BatchError):
    """The queue is full (`limit` texts)."""

    def __init__(self, message: str, retry_after: int, limit: int) -> None:
        super().__init__(message, retry_after)
        self.limit = limit


class TimedOut(BatchError):
    """Not answered within the request timeout."""


class Refused(BatchError):
    """The predictor refused items: (index in the request or None, why) each."""

    def __init__(self, message: str, problems: list[tuple[int | None, str]]) -> None:
        super().__init__(message)
        self.problems = problems


class Failed(BatchError):
    """The prediction failed for this request (inference error, or a bug)."""


EMPTY = object()  # what get_within returns when nothing arrived in time


async def get_within(queue: asyncio.Queue[Any], seconds: float) -> Any:
    """The next queue entry, or EMPTY after `seconds`.

    Built on asyncio.wait, which reports a timeout by returning, not raising: asyncio.wait_for
    raises asyncio.TimeoutError, which before Python 3.11 is not the builtin TimeoutError, so
    an `except TimeoutError` there killed the batching worker on 3.10.
    """
    getter = asyncio.ensure_future(queue.get())
    done, _ = await asyncio.wait({getter}, timeout=max(seconds, 0))
    if done:
        return getter.result()
    getter.cancel()  # a cancelled get leaves the entry in the queue: nothing is lost
    await asyncio.wait({getter})  # let the cancel land (raises nothing, unlike awaiting getter)
    if not getter.cancelled():  # it got an entry between the timeout and the cancel
        return getter.result()
    return EMPTY


@dataclass
class Pending:
    """One request's items waiting in the queue, and where its results go."""

    items: list[Pair]
    future: asyncio.Future[list[Result]]
    arrived: float  # event-loop time it was queued
    longest: int = 0  # tokens of its longest item (counted only when max_batch_tokens is set)
    queued: bool = True  # still counted in the queue (not yet taken into a batch, not expired)


class Batcher:
    """Coalesces concurrent requests into one `predict` call of up to `max_batch_size` texts.

    A single worker task takes the oldest request, then adds queued requests until the batch
    is full (`max_batch_size` texts, or `max_batch_tokens` padded tokens: texts x the longest),
    or the oldest has waited `max_wait_ms`, or no other request is being received (so a lone
    client never waits for company). A request's texts stay in one batch; a request larger
    than the batch runs alone. Calls run on one executor thread, off the event loop and one at
    a time per session; each request gets exactly its own slice of the results, in order.
    While a call runs, new requests queue up and form the next batch, so under load batches
    fill without waiting.

    Load shedding: at most `max_queue` texts wait (more: 503 with Retry-After), and a request
    not answered within `request_timeout_s` gets a 504 and leaves the queue. The worker is
    supervised: if it crashes, the requests it held get a 503, `up` is False until it is
    restarted (after `restart_delay_s`), and queued requests are then served.
    """

    def __init__(self, predictor: PredictorLike, config: ServeConfig, metrics: Metrics,
                 restart_delay_s: float = 0.5) -> None:
        self.predictor, self.metrics, self.config = predictor, metrics, config
        self.max_batch_size, self.max_wait_s = config.max_batch_size, config.max_wait_ms / 1000
        self.run_batch_size = config.run_batch_for(predictor.providers)
        # One batch at a time by default: onnxruntime's intra-op threads already use every core;
        # more workers suit several cores per session thread pool (e.g. --threads 1 --workers 4).
        self.workers = config.workers
        self.executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="bertedge-predict")
        self.slots = asyncio.Semaphore(self.workers)  # predictor calls in flight at once
        self.in_flight: set[asyncio.Task[None]] = set()
        self.queue: asyncio.Queue[Pending | None] = asyncio.Queue()
        self.held: Pending | None = None  # taken from the queue, but it did not fit the last batch
        self.current: list[Pending] = []  # the batch being collected or run (failed if the worker dies)
        self.worker: asyncio.Task[None] | None = None
        self.closing = False
        self.arriving = 0  # requests being read and validated, about to be submitted
        self.queued_texts = 0  # texts waiting for a batch (the bounded queue's fill)
        self.running = False  # the worker loop is up (False while it restarts after a crash)
        self.restart_delay_s = restart_delay_s

    @property
    def up(self) -> bool:
        """The batching worker is running and taking batches."""
        return self.running and self.worker is not None and not self.worker.done()

    @contextlib.contextmanager
    def receiving(self) -> Iterator[None]:
        """Marks a request as on its way in, so the batch being collected waits for it."""
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1

    async def call(self, items: Sequence[Pair]) -> list[Result]:
        """Run items through the predictor on the executor thread (also used for warm-up)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._predict, list(items))

    def _predict(self, items: list[Pair]) -> list[Result]:
        return self.predictor.predict_isolated(items, batch_size=self.run_batch_size)

    def start(self) -> None:
        self.running = True
        self.worker = asyncio.create_task(self._supervise(), name="bertedge-batcher")

    async def submit(self, items: list[Pair]) -> list[Result]:
        """Queue one request's items; its results, in order, once its batch has run.

        Raises:
            NotAccepting: starting, shutting down, or the worker crashed holding this request.
            Overloaded: the queue is full.
            TimedOut: not answered within the request timeout.
            Refused: the predictor refused some of its items (their indices and why).
            Failed: the prediction failed for this request.
        """
        if self.closing or self.worker is None:
            raise NotAccepting("the server is not accepting predictions (starting or shutting down)")
        limit = self.config.max_queue
        if self.queued_texts and self.queued_texts + len(items) > limit:
            self.metrics.shed.inc()
            raise Overloaded(f"overloaded: {self.queued_texts} texts are queued (limit {limit}); "
                             "retry later", self.retry_after(), limit)
        loop = asyncio.get_running_loop()
        longest = max(self.predictor.count_tokens(items)) if self.config.max_batch_tokens else 0
        pending = Pending(items, loop.create_future(), loop.time(), longest)
        self._queued(len(items))
        self.queue.put_nowait(pending)
        timeout = self.config.request_timeout_s
        timer = loop.call_later(timeout, self._expire, pending) if timeout else None
        try:
            return await pending.future
        finally:
            if timer is not None:
                timer.cancel()

    def _expire(self, pending: Pending) -> None:
        """The request's deadline passed: a 504 now, and its place in the queue is freed."""
        if pending.future.done():
            return
        self._dequeue(pending)  # a batch already running it just drops its results
        self.metrics.timed_out.inc()
        pending.future.set_exception(TimedOut(
            f"no prediction within the request timeout ({self.config.request_timeout_s:g} s); "
            "the server is overloaded or the texts are too long", self.retry_after()))

    def retry_after(self) -> int:
        """Seconds a shed client should wait: the queue's drain time at the recent batch rate, >= 1."""
        per_text = self.metrics.seconds_per_text()
        return max(1, math.ceil(self.queued_texts * per_text)) if per_text else 1

    def _queued(self, texts: int) -> None:
        self.queued_texts += texts
        self.metrics.queue_depth.set(self.queued_texts)

    def _dequeue(self, pending: Pending) -> None:
        if pending.queued:
            pending.queued = False
            self._queued(-len(pending.items))

    async def close(self) -> None:
        """Stop taking requests, finish every queued one, then stop the worker and the thread."""
        self.closing = True
        if self.worker is not None:
            self.queue.put_nowait(None)
            await self.worker
        self.executor.shutdown(wait=True)

    async def _supervise(self) -> None:
        """Run the worker loop; after a crash fail what it held, wait, and start it again."""
        while True:
            try:
                await self._work()
                return
            except Exception as e:  # a bug in the batcher itself: never leave requests hanging
                self.running = False
                self.metrics.worker_up.set(0)
                self.metrics.restarts.inc()
                log.error("the batching worker crashed; restarting in %g s", self.restart_delay_s,
                          exc_info=e)
                for pending in self.current:
                    self._dequeue(pending)
                    self._fail(pending, NotAccepting("the batching worker crashed; retry", 1))
                self.current = []
                if self.closing:  # the crash may have eaten the stop marker: the restart needs one
                    self.queue.put_nowait(None)
                await asyncio.sleep(self.restart_delay_s)
                self.running = True
                self.metrics.worker_up.set(1)

    async def _work(self) -> None:
        while True:
            await self.slots.acquire()  # a free predictor slot first: meanwhile the queue fills
            try:
                batch, stop = await self._collect()
            except BaseException:
                self.slots.release()
                raise
            if batch:
                task = asyncio.create_task(self._run_in_slot(batch))
                self.in_flight.add(task)
                task.add_done_callback(self.in_flight.discard)
            else:
                self.slots.release()
            self.current = []
            if stop:
                await asyncio.gather(*self.in_flight)
                return

    async def _run_in_slot(self, batch: list[Pending]) -> None:
        """Run one batch, then free its slot; a bug here fails this batch's requests, not the worker."""
        try:
            await self._run(batch)
        except Exception as e:
            log.error("a batch failed unexpectedly", exc_info=e)
            for pending in batch:
                self._fail(pending, Failed(f"prediction failed ({type(e).__name__})"))
        finally:
            self.slots.release()

    async def _next(self) -> Pending | None:
        """The next live queue entry (expired requests are dropped), or None: the stop marker."""
        while True:
            entry = self.held or await self.queue.get()
            self.held = None
            if entry is None or not entry.future.done():
                return entry

    async def _collect(self) -> tuple[list[Pending], bool]:
        """The next batch, and whether the stop marker was reached."""
        first = await self._next()
        if first is None:
            return [], True
        self._dequeue(first)
        batch, size, longest = [first], len(first.items), first.longest
        self.current = batch
        deadline = first.arrived + self.max_wait_s
        loop = asyncio.get_running_loop()
        while size < self.max_batch_size:
            try:
                nxt = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0 or not self.arriving:
                    break
                got = await get_within(self.queue, remaining)
                if got is EMPTY:
                    break
                nxt = got  # type: ignore[assignment]
            if nxt is None:
                return batch, True
            if nxt.future.done():  # timed out while queued
                continue
            if size + len(nxt.items) > self.max_batch_size or self._too_many_tokens(
                    size + len(nxt.items), max(longest, nxt.longest)):
                self.held = nxt  # keeps its texts together: it starts the next batch
                break
            self._dequeue(nxt)
            batch.append(nxt)
            size, longest = size + len(nxt.items), max(longest, nxt.longest)
        return batch, False

    def _too_many_tokens(self, texts: int, longest: int) -> bool:
        """Would a batch of `texts` padded to `longest` tokens exceed --max-batch-tokens?"""
        limit = self.config.max_batch_tokens
        return bool(limit) and texts * longest > limit  # type: ignore[operator]

    async def _run(self, batch: list[Pending]) -> None:
        """Predict a batch and hand each request its slice; a bad request fails alone.

        The predictor already isolates items (a failing row gets an error record); a request
        with an error record fails, the others get their results. Should the call itself raise,
        each request is run again on its own to find the one at fault.
        """
        live = [p for p in batch if not p.future.done()]  # a cancelled caller needs no answer
        if not live:
            return
        items = [item for p in live for item in p.items]
        started = time.perf_counter()
        try:
            results = await self.call(items)
        except Exception as e:
            if len(live) > 1:  # find the request at fault; the others still get their answers
                for p in live:
                    await self._run([p])
            elif isinstance(e, BertedgeError):  # the runtime refused an input that passed our checks
                self._fail(live[0], Refused(str(e), [(None, e.problem)]))
            else:  # this request's items break the predictor: a 500 for it alone
                log.error("prediction failed for one request", exc_info=e)
                self._fail(live[0], Failed(f"prediction failed ({type(e).__name__}: {str(e)[:200]})"))
            return
        self._observe(len(items), len(live), time.perf_counter() - started, results)
        offset = 0
        for p in live:
            mine = results[offset: offset + len(p.items)]
            offset += len(p.items)
            if not p.future.done():
                error = request_error(mine)
                if error is None:
                    p.future.set_result(mine)
                else:
                    p.future.set_exception(error)

    @staticmethod
    def _fail(pending: Pending, error: Exception) -> None:
        if not pending.future.done():
            pending.future.set_exception(error)

    def _observe(self, texts: int, requests: int, seconds: float, results: list[Result]) -> None:
        self.metrics.recent_seconds_per_text = seconds / max(texts, 1)
        self.metrics.batch_size.observe(texts)
        self.metrics.batch_requests.observe(requests)
        self.metrics.inference.observe(seconds)
        self.metrics.texts.inc(texts)
        self.metrics.truncated.inc(sum(bool(r.get("truncated")) for r in results))
        for r in results:  # only a cascade bundle's results carry a stage
            if isinstance(r.get("stage"), int):
                self.metrics.stage_texts.labels(str(r["stage"])).inc()


def request_error(results: list[Result]) -> BatchError | None:
    """Why one request's results cannot be its answer: an item's inference failed (Failed) or the
    predictor refused an item (Refused); None when every item has a prediction.

    >>> request_error([{"label": "a"}]) is None, request_error([{}, {"error": "empty text"}]).problems
    (True, [(1, 'empty text')])
    """
    errors = [(i, str(r["error"])) for i, r in enumerate(results) if "error" in r]
    if not errors:
        return None
    failed = [why for _, why in errors if why.startswith(INFERENCE_FAILED)]
    if failed:
        return Failed(f"prediction failed for {len(failed)} item(s): {failed[0]}")
    return Refused(f"invalid request: {len(errors)} problem(s)", list(errors))
