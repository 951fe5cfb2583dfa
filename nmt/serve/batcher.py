"""Requests gathered into batches, decoded one batch at a time in one worker thread.

Each request becomes a ``Job``: the segments it asks for, the model and the search settings.
One collector task takes the oldest waiting job and every other job waiting for the same
model and settings, in arrival order, until the batch holds ``max_batch_tokens`` source
tokens or ``max_batch_requests`` requests, or no job has joined it for ``max_wait``; while it
holds fewer requests than the batch before it, the collector waits up to ``GATHER_WAITS`` times
``max_wait`` (counted from when it began gathering, so a job that waited during the previous
batch's decoding waits at most that much more). That expectation is what keeps a busy server's
batches full: when a batch's answers go out, its clients' next requests come back over tens of
milliseconds, and a wait counted from the oldest job split them into two cohorts that then
alternate forever, each decoding while the other's answers travel (measured with 64 clients
sending test2016 lines for 12 s: 49.6 to 50.8 requests/s in batches of 32 on average, alternating
46 and 18; 71.0 in batches of 64). A lone client pays one ``max_wait`` per request. The batch's
segments go through ``nmt.translate`` as one input: sorted by length, cut into the same
batches ``nmt translate`` makes, and since every sentence's search is independent of its
batch (in fp32 on nmt's engine), a request gets the translation it would get alone.

Decoding runs in one worker thread, so the event loop keeps accepting and answering while a
batch decodes, and torch's intra-op threads (set once at start) are the only parallelism:
no worker processes, nothing to fork. A request that times out or whose client goes away
is dropped from the jobs not yet started; a batch already decoding finishes, and its
answers for gone requests are discarded. ``close`` lets the jobs already taken finish and
refuses new ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from nmt.config import SearchConfig
from nmt.serve.models import ServedModel
from nmt.translate import Translation

log = logging.getLogger("nmt")


class Refused(Exception):
    """A request the server will not take now; ``status`` is its HTTP code."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


GATHER_WAITS = 10  # the most a batch is gathered for, in units of max_wait


@dataclass
class Job:
    model: ServedModel
    cfg: SearchConfig
    segments: list[str]
    tokens: int
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple[int, SearchConfig]:
        return self.model.id, self.cfg

    @property
    def gone(self) -> bool:  # timed out, or its client went away
        return self.future.done()


@dataclass
class Limits:
    max_batch_tokens: int | None = None  # None: the model's search.max_tokens
    max_batch_requests: int = 64  # 1: every request decoded on its own
    max_wait: float = 0.005  # seconds without a new job that end the gathering of a batch
    max_queue: int = 256  # jobs waiting or decoding; more are refused (503)
    timeout: float = 30.0  # seconds a request may take in all (504 after)


@dataclass
class Stats:
    batches: int = 0
    requests: int = 0
    segments: int = 0


class Batcher:
    def __init__(self, limits: Limits):
        self.limits = limits
        self.waiting: list[Job] = []
        self.pending = 0  # jobs submitted and not yet answered
        self.last_size = 0  # jobs in the last batch gathered
        self.arrival = asyncio.Event()
        self.closing = False
        self.stats = Stats()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="nmt-decode")
        self.task: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.task = self.loop.create_task(self._collect(), name="nmt-batcher")

    async def translate(self, model: ServedModel, cfg: SearchConfig, segments: list[str]) -> list[Translation]:
        """The translations of ``segments``, decoded among other requests' segments."""
        if not segments:
            return []
        if self.closing:
            raise Refused(503, "the server is shutting down; send the request again to a running one")
        if self.pending >= self.limits.max_queue:
            raise Refused(503, f"the server is busy ({self.pending} requests waiting, --max-queue "
                               f"{self.limits.max_queue}); try again shortly")
        job = Job(model, cfg, segments, model.tokens(segments), asyncio.get_running_loop().create_future())
        self.pending += 1
        self.waiting.append(job)
        self.arrival.set()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.limits.timeout)
        except asyncio.TimeoutError:
            raise Refused(504, f"translation took longer than {self.limits.timeout:g} s (--timeout)") from None
        finally:
            if not job.future.done():  # timed out or cancelled (the client went away): drop it
                job.future.cancel()
            self.pending -= 1

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.waiting = [job for job in self.waiting if not job.gone]
            if not self.waiting:
                self.arrival.clear()
                await self.arrival.wait()
                continue
            batch = await self._gather()
            if batch:
                await loop.run_in_executor(self.executor, self._decode, batch)

    def _matching(self, first: Job) -> list[Job]:
        """The waiting jobs that go with ``first`` (itself included), oldest first, within limits."""
        batch, tokens = [], 0
        for job in self.waiting:
            if job.key != first.key or job.gone:
                continue
            if batch and (len(batch) >= self.limits.max_batch_requests
                          or tokens + job.tokens > (self.limits.max_batch_tokens or job.model.search.max_tokens)):
                break
            batch.append(job)
            tokens += job.tokens
        return batch

    def _full(self, batch: list[Job]) -> bool:
        most = self.limits.max_batch_tokens or batch[0].model.search.max_tokens
        return len(batch) >= self.limits.max_batch_requests or sum(job.tokens for job in batch) >= most

    async def _gather(self) -> list[Job]:
        first = self.waiting[0]
        batch = self._matching(first)
        started = time.monotonic()
        most = started + GATHER_WAITS * self.limits.max_wait
        while not self._full(batch) and not self.closing:
            # Until no job has come for max_wait; while the batch is smaller than the last one,
            # whose clients are likely sending their next requests, until the most.
            until = max(started, max(job.arrived for job in batch)) + self.limits.max_wait
            left = min(most if len(batch) < self.last_size else until, most) - time.monotonic()
            if left <= 0:
                break
            self.arrival.clear()
            try:
                await asyncio.wait_for(self.arrival.wait(), left)
            except asyncio.TimeoutError:
                break
            batch = self._matching(first)
        self.last_size = len(batch)
        taken = {id(job) for job in batch}
        self.waiting = [job for job in self.waiting if id(job) not in taken]
        return [job for job in batch if not job.gone]

    def _decode(self, batch: list[Job]) -> None:
        """In the worker thread: one input of all the batch's segments, answers handed back."""
        loop = self.loop
        lines = [segment for job in batch for segment in job.segments]
        model, cfg = batch[0].model, batch[0].cfg
        try:
            translations = model.decode(lines, cfg, source_name="request")
        except Exception as e:  # every request of the batch gets the error (500)
            log.error("decoding a batch of %d segments failed: %s: %s", len(lines), type(e).__name__, e)
            for job in batch:
                loop.call_soon_threadsafe(_answer, job.future, None, e)
            return
        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.segments += len(lines)
        start = 0
        for job in batch:
            part = translations[start: start + len(job.segments)]
            start += len(job.segments)
            loop.call_soon_threadsafe(_answer, job.future, part, None)

    async def close(self) -> None:
        """Refuse new requests, let the ones taken finish, stop the collector and the worker."""
        self.closing = True
        while self.pending:
            await asyncio.sleep(0.01)
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True)


def _answer(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():  # its request timed out or went away meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
