"""One thread runs all of the server's device work, and decodes concurrent requests' windows as one batch.

Each request transcribes in its own thread (runtime.longform), but it never touches the model
itself: its `decode(model, mel, options)` calls, and the few other device calls of the loop
(language detection, the encoder for word timestamps, the alignment pass), are queued here and run
by one worker thread, in order of arrival. When the worker takes a window to decode, it takes
with it every queued window with the same decoding options, up to `max_batch` rows, and decodes
them as one device batch (runtime.decoding.DecodingTask runs a batch of windows as it runs one);
each request gets its own rows back. So requests run concurrently, and a decoder step reads the
weights once for all of them.

Only windows whose rows cannot affect each other are batched: greedy decoding at temperature 0,
where each row's tokens depend on its own audio and prompt alone (runtime.longform batches such
windows of one file the same way, and tests/test_batched.py checks that batching changes no
tokens). Beam search and sampling run alone: a batch of beams runs until every window's beams have
finished, and samples would draw from a shared generator. Rows must share their options, prompt
included: windows conditioned on different previous text are decoded one after the other.

A request whose client went away is cancelled: its queued work is dropped and its thread stops
at the next window (Cancelled).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import numpy as np

from runtime.decoding import DecodingOptions, decode


class Cancelled(Exception):
    """The request this work was for was cancelled (its client disconnected, or the server stops)."""


@dataclass(eq=False)
class _Job:
    cancel: Optional[threading.Event]
    run: Optional[Callable[[], Any]] = None  # work that is not batched
    key: Any = None  # decoding work: rows with equal keys decode as one batch
    kind: str = ""  # "mel" or "features"
    rows: int = 0
    inputs: Any = None
    single: bool = False  # a [n_mels, n_frames] mel: decode returns one result, not a list
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: Optional[BaseException] = None

    def finish(self, result=None, error: Optional[BaseException] = None) -> None:
        self.result, self.error = result, error
        self.done.set()

    def wait(self):
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value


def _batch_key(options: DecodingOptions, tokenizer_path) -> Optional[tuple]:
    """The key of a decode that may share a batch with others of the same key; None if it must run alone."""
    if options.temperature != 0 or options.beam_size is not None:
        return None
    return (str(tokenizer_path),) + tuple(_hashable(getattr(options, name))
                                          for name in DecodingOptions.__dataclass_fields__)


class Scheduler:
    """Runs device work for many threads on one worker thread; see the module docstring."""

    def __init__(self, model, max_batch: int = 16):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model = model
        self.max_batch = max_batch
        self._queue: deque = deque()
        self._lock = threading.Condition()
        self._closing = False
        self.batches = 0  # device batches decoded
        self.rows = 0  # windows decoded in them
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._work, name="runtime-scheduler", daemon=True)
        self._thread.start()

    # -- what request threads call ------------------------------------------------------------
    def call(self, fn: Callable, *args, cancel: Optional[threading.Event] = None, **kwargs):
        """fn(*args, **kwargs) on the worker thread; its result, or its exception, here."""
        return self._submit(_Job(cancel, run=lambda: fn(*args, **kwargs)))

    def decode(self, model, mel, options: DecodingOptions = DecodingOptions(), *, tokenizer_path=None,
               rng=None, cancel: Optional[threading.Event] = None):
        """runtime.decoding.decode, batched with other requests' windows where that cannot change them.
        `model` is ignored: the scheduler's model runs every decode."""
        key = _batch_key(options, tokenizer_path) if rng is None or options.temperature == 0 else None
        if key is not None and isinstance(mel, np.ndarray) and mel.ndim in (2, 3):
            batch = mel[None] if mel.ndim == 2 else mel
            return self._submit(_Job(cancel, key=("mel", key), kind="mel", rows=batch.shape[0],
                                     inputs=(batch, options, tokenizer_path), single=mel.ndim == 2))
        if key is not None and hasattr(mel, "buffer") and getattr(mel, "batch_size", 0) == 1 \
                and hasattr(self.model, "_to_host"):
            return self._submit(_Job(cancel, key=("features", key), kind="features", rows=1,
                                     inputs=(mel, options, tokenizer_path)))
        return self._submit(_Job(cancel, run=lambda: decode(self.model, mel, options, tokenizer_path=tokenizer_path,
                                                            rng=rng)))

    def close(self) -> None:
        """Finish the queued work, then stop the worker."""
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
        if job.cancel is not None and job.cancel.is_set():
            raise Cancelled()
        with self._lock:
            if self._closing:
                raise Cancelled()
            self._queue.append(job)
            self._lock.notify()
        return job.wait()

    def _next_batch(self) -> Optional[List[_Job]]:
        with self._lock:
            while True:
                while self._queue:
                    job = self._queue.popleft()
                    if job.cancel is not None and job.cancel.is_set():
                        job.finish(error=Cancelled())
                        continue
                    batch, rows = [job], job.rows
                    if job.key is not None:
                        for other in list(self._queue):
                            if rows >= self.max_batch:
                                break
                            if other.key == job.key and rows + other.rows <= self.max_batch \
                                    and not (other.cancel is not None and other.cancel.is_set()):
                                self._queue.remove(other)
                                batch.append(other)
                                rows += other.rows
                    return batch
                if self._closing:
                    return None
                self._lock.wait()

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                if batch[0].run is not None:
                    batch[0].finish(batch[0].run())
                else:
                    self._decode_batch(batch)
            except BaseException as exc:  # every waiting request gets the error; the worker lives on
                for job in batch:
                    if not job.done.is_set():
                        job.finish(error=exc)

    def _decode_batch(self, batch: List[_Job]) -> None:
        _, options, tokenizer_path = batch[0].inputs
        if batch[0].kind == "mel":
            inputs = np.concatenate([job.inputs[0] for job in batch]) if len(batch) > 1 else batch[0].inputs[0]
        elif len(batch) == 1:
            inputs = batch[0].inputs[0]
        else:  # one window's encoder output per request, joined into one batch on the device
            from runtime.engine import MaxAudioFeatures

            host = np.concatenate([self.model._to_host(job.inputs[0].buffer) for job in batch])
            inputs = MaxAudioFeatures(self.model._to_device(host), host.shape[0])
        results = decode(self.model, inputs, options, tokenizer_path=tokenizer_path)
        rows = sum(job.rows for job in batch)
        self.batches += 1
        self.rows += rows
        self.largest_batch = max(self.largest_batch, rows)
        start = 0
        for job in batch:
            mine = results[start:start + job.rows]
            start += job.rows
            job.finish(mine[0] if job.single else mine)


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
