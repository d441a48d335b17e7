"""One thread runs all of the server's device work, and decodes concurrent requests' windows as rows of one running batch.

Each request transcribes in its own thread (runtime.longform), but it never touches the model
itself: its `decode(model, mel, options)` calls, and the few other device calls of the loop
(language detection, the encoder for word timestamps, the alignment pass), are queued here and run
by one worker thread. Windows decoded greedily at temperature 0 with a known language (every
window of transcribe()'s defaults until a fallback) join a running batch as soon as a row is free
(runtime.continuous): each decoder step advances the windows of every request in flight, whatever
their prompts and however far along each is, and a window that reaches its end leaves and hands
its result back at once. So throughput grows with load, and each request's tokens are the ones
it gets alone. Other work (beam search, sampling at a fallback temperature, language detection,
the encoder and alignment passes of word timestamps) runs alone between two steps, in order of
arrival.

A request whose client went away is cancelled: its queued work is dropped, its rows leave the
batch, and its thread stops at the next window (Cancelled).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

from runtime.continuous import ContinuousDecoder, joins
from runtime.decoding import DecodingOptions, _as_features, decode


class Cancelled(Exception):
    """The request this work was for was cancelled (its client disconnected, or the server stops)."""


@dataclass(eq=False)
class _Job:
    cancel: Optional[threading.Event]
    run: Optional[Callable[[], Any]] = None  # work that runs alone
    inputs: Any = None  # windows that join the batch: (mel or audio features, options, tokenizer_path)
    rows: int = 0
    single: bool = False  # a [n_mels, n_frames] mel: the caller gets one result, not a list
    results: List[Any] = field(default_factory=list)
    pending: int = 0  # rows still decoding
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: Optional[BaseException] = None

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def finish(self, result=None, error: Optional[BaseException] = None) -> None:
        if self.done.is_set():
            return
        self.result, self.error = result, error
        self.done.set()

    def wait(self):
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


class Scheduler:
    """Runs device work for many threads on one worker thread; see the module docstring."""

    def __init__(self, model, max_batch: int = 16):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model = model
        self.max_batch = max_batch
        # models without row batches (a test's stand-in) decode every window alone
        self._rows = ContinuousDecoder(model, max_batch) if hasattr(model, "row_batch") else None
        self._queue: deque = deque()
        self._lock = threading.Condition()
        self._closing = False
        self.windows = 0  # windows decoded as rows of the running batch
        self._thread = threading.Thread(target=self._work, name="runtime-scheduler", daemon=True)
        self._thread.start()

    @property
    def steps(self) -> int:
        """Decoder steps the running batch took."""
        return self._rows.steps if self._rows else 0

    @property
    def row_steps(self) -> int:
        """Rows those steps advanced, summed (row_steps / steps: the mean batch)."""
        return self._rows.row_steps if self._rows else 0

    @property
    def largest_batch(self) -> int:
        return self._rows.largest if self._rows else 0

    # -- what request threads call ------------------------------------------------------------
    def call(self, fn: Callable, *args, cancel: Optional[threading.Event] = None, **kwargs):
        """fn(*args, **kwargs) on the worker thread; its result, or its exception, here."""
        return self._submit(_Job(cancel, run=lambda: fn(*args, **kwargs)))

    def decode(self, model, mel, options: DecodingOptions = DecodingOptions(), *, tokenizer_path=None,
               rng=None, cancel: Optional[threading.Event] = None):
        """runtime.decoding.decode; windows that can join the running batch do.
        `model` is ignored: the scheduler's model runs every decode."""
        rows = mel.shape[0] if isinstance(mel, np.ndarray) and mel.ndim == 3 else \
            1 if isinstance(mel, np.ndarray) else getattr(mel, "batch_size", 0)
        if self._rows is not None and joins(options) and 1 <= rows <= self.max_batch:
            single = isinstance(mel, np.ndarray) and mel.ndim == 2
            return self._submit(_Job(cancel, inputs=(mel, options, tokenizer_path), rows=rows, single=single))
        return self._submit(_Job(cancel, run=lambda: decode(self.model, mel, options, tokenizer_path=tokenizer_path,
                                                            rng=rng)))

    def close(self) -> None:
        """Finish the queued work and the running rows, then stop the worker."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self._thread.join()

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._queue)

    # -- the worker -------------------------------------------------------------------------------
    def _submit(self, job: _Job):
        if job.cancelled:
            raise Cancelled()
        with self._lock:
            if self._closing:
                raise Cancelled()
            self._queue.append(job)
            self._lock.notify()
        return job.wait()

    def _take(self) -> Optional[Tuple[List[_Job], Optional[_Job]]]:
        """The windows that join now (as many as there are free rows) and at most one job that
        runs alone, in order of arrival; None when closing with nothing left."""
        with self._lock:
            running = bool(self._rows and self._rows.rows)
            while not self._queue and not running:
                if self._closing:
                    return None
                self._lock.wait()
            joining, alone = [], None
            free = self._rows.free if self._rows else 0
            for job in list(self._queue):
                if job.cancelled:
                    self._queue.remove(job)
                    job.finish(error=Cancelled())
                elif job.run is None and job.rows <= free:
                    self._queue.remove(job)
                    joining.append(job)
                    free -= job.rows
                elif job.run is not None and alone is None:
                    self._queue.remove(job)
                    alone = job
            return joining, alone

    def _work(self) -> None:
        while (taken := self._take()) is not None:
            joining, alone = taken
            if alone is not None:
                try:
                    alone.finish(alone.run())
                except BaseException as exc:  # the request gets the error; the worker lives on
                    alone.finish(error=exc)
            for job in joining:
                self._join(job)
            if self._rows and self._rows.rows:
                self._step()

    def _join(self, job: _Job) -> None:
        mel, options, tokenizer_path = job.inputs
        try:
            features, _ = _as_features(self.model, mel)
            job.results, job.pending = [None] * job.rows, job.rows
            for i in range(job.rows):
                row = features if job.rows == 1 else features.row(i)
                self._deliver(self._rows.join(row, options, tokenizer_path, (job, i)))
        except BaseException as exc:
            self._rows.drop(lambda owner: owner[0] is job)
            job.finish(error=exc)

    def _step(self) -> None:
        cancelled = {owner[0] for owner in (row.owner for row in self._rows.rows) if owner[0].cancelled}
        if cancelled:
            self._rows.drop(lambda owner: owner[0] in cancelled)
            for job in cancelled:
                job.finish(error=Cancelled())
            if not self._rows.rows:
                return
        try:
            self._deliver(self._rows.step())
        except BaseException as exc:  # every request with a row gets the error; the worker lives on
            for job in {owner[0] for owner in self._rows.clear()}:
                job.finish(error=exc)

    def _deliver(self, finished) -> None:
        for (job, i), result in finished:
            job.results[i] = result
            job.pending -= 1
            self.windows += 1
            if job.pending == 0:
                job.finish(job.results[0] if job.single else job.results)


class ScheduledModel:
    """The model as a request's transcription sees it: its device calls run on the scheduler's
    thread (runtime.inference.Inference, plus the loaded model's other attributes)."""

    def __init__(self, scheduler: Scheduler, cancel: Optional[threading.Event] = None):
        self._scheduler = scheduler
        self._model = scheduler.model
        self._cancel = cancel

    def __getattr__(self, name):  # dims, is_multilingual, mel_filters, tokenizer_path ...
        return getattr(self._model, name)

    def encode(self, mel):
        return self._scheduler.call(self._model.encode, mel, cancel=self._cancel)

    def decoder(self, audio_features, repeats: int = 1):
        session = self._scheduler.call(self._model.decoder, audio_features, repeats, cancel=self._cancel)
        return _ScheduledSession(self._scheduler, session, self._cancel)

    def cross_attention_scores(self, audio_features, tokens, heads):
        return self._scheduler.call(self._model.cross_attention_scores, audio_features, tokens, heads,
                                    cancel=self._cancel)

    def decode(self, model, mel, options, *, tokenizer_path=None, rng=None):
        """runtime.decoding.decode's signature, for runtime.longform's decode_fn."""
        return self._scheduler.decode(model, mel, options, tokenizer_path=tokenizer_path, rng=rng,
                                      cancel=self._cancel)


class _ScheduledSession:
    def __init__(self, scheduler: Scheduler, session, cancel):
        self._scheduler, self._session, self._cancel = scheduler, session, cancel

    def prefill(self, tokens, positions):
        return self._scheduler.call(self._session.prefill, tokens, positions, cancel=self._cancel)

    def step(self, tokens):
        return self._scheduler.call(self._session.step, tokens, cancel=self._cancel)

    def reorder(self, source_indices):
        return self._scheduler.call(self._session.reorder, source_indices, cancel=self._cancel)
