"""Continuous batching: windows decoded greedily as rows that join and leave one running batch.

Two callers: the server's scheduler (runtime.scheduler) hands the windows of many requests to one
ContinuousDecoder, and transcribe_batch (runtime.batched) decodes the chunks of many files through
decode_windows. A window joins as soon as there is a free row: it is prefilled alone (its own
audio, its own prompt of any length) and then advances one token per decoder step beside the
rows already running, each at its own position (runtime.engine.MaxRowBatch). A row that reaches
EOT leaves at once and its result goes back to its caller; the next waiting window takes the row.
So a step reads the weights once for every request in flight, however far along each is.

Every row runs runtime.decoding.DecodingTask's own pieces (the prefill's logit positions, the
no-speech probability, the logit filters, the greedy update, the stop rule and the result), on
its own tokens: a row's tokens are the ones decode() gives for that window alone.

Only windows whose rows cannot affect each other join: greedy decoding at temperature 0 with the
language known (transcribe() detects it once before its windows). Beam search, sampling and
language detection run alone (runtime.scheduler).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Tuple

import numpy as np

from runtime.decoding import DecodingOptions, DecodingResult, DecodingTask, GreedyDecoder, verify_options


def joins(options: DecodingOptions) -> bool:
    """Whether a window decoded with `options` can be a row of the shared batch."""
    return (options.temperature == 0 and options.beam_size is None and options.language is not None
            and options.task in ("transcribe", "translate"))


@dataclass(eq=False)
class _Row:
    owner: Any  # the caller's handle, returned with the result
    task: DecodingTask
    decoder: GreedyDecoder
    tokens: np.ndarray  # [1, length]
    sum_logprobs: np.ndarray  # float32 [1]
    no_speech_probs: List[float]
    sampled: int = 1  # DecodingTask's loop counter: the prefill sampled the first token

    def result(self) -> DecodingResult:
        (result,) = self.task.results(self.decoder, self.tokens, self.sum_logprobs, self.no_speech_probs,
                                      [self.task.options.language], None)
        return result


class ContinuousDecoder:
    """A running batch of window rows on one model; see the module docstring. Not thread-safe:
    one thread (the scheduler's worker) calls it."""

    def __init__(self, model, max_rows: int):
        self.model = model
        self.batch = model.row_batch(max_rows)
        self.rows: List[_Row] = []
        self.steps = 0  # decoder steps run
        self.row_steps = 0  # rows advanced by them, summed
        self.largest = 0  # the most rows one step advanced

    @property
    def free(self) -> int:
        return self.batch.max_rows - len(self.rows)

    def join(self, features, options: DecodingOptions, tokenizer_path, owner) -> List[Tuple[Any, DecodingResult]]:
        """Adds one window (audio features of batch 1) as a row; returns [(owner, result)] when it
        finished on its first token, else []."""
        if not joins(options):
            raise ValueError("only greedy decoding at temperature 0 with a known language joins the batch")
        task = DecodingTask(self.model, verify_options(options), tokenizer_path=tokenizer_path)
        tokens = np.asarray(task.initial_tokens, dtype=np.int64)[None]
        out = self.batch.join(features, tokens[0], task.prefill_logit_positions(tokens.shape[1]))
        no_speech_probs, logits = task.first_logits(out)
        decoder = GreedyDecoder(0.0, task.tokenizer.eot, normalizers=task.normalizers)
        row = _Row(owner, task, decoder, tokens, np.zeros(1, dtype=np.float32), no_speech_probs)
        row.tokens, stop = task.advance(row.decoder, row.tokens, logits, row.sum_logprobs)
        self.rows.append(row)
        if stop or row.sampled >= task.sample_len:
            return [self._finish(len(self.rows) - 1)]
        return []

    def step(self) -> List[Tuple[Any, DecodingResult]]:
        """Advances every row by one token; returns (owner, result) of the rows that finished."""
        logits = self.batch.step([int(row.tokens[0, -1]) for row in self.rows])
        self.steps += 1
        self.row_steps += len(self.rows)
        self.largest = max(self.largest, len(self.rows))
        finished = []
        for i, row in enumerate(self.rows):
            row.tokens, stop = row.task.advance(row.decoder, row.tokens, np.array(logits[i: i + 1]), row.sum_logprobs)
            row.sampled += 1
            if stop or row.sampled >= row.task.sample_len:
                finished.append(i)
        return [self._finish(i) for i in reversed(finished)]  # from the end: a leaving row's place takes the last

    def drop(self, unwanted: Callable[[Any], bool]) -> None:
        """Removes, unfinished, the rows whose owner is unwanted (their request was cancelled)."""
        for i in reversed(range(len(self.rows))):
            if unwanted(self.rows[i].owner):
                self._leave(i)

    def clear(self) -> List[Any]:
        """Removes every row (after a failed step); returns their owners."""
        owners = [row.owner for row in self.rows]
        for i in reversed(range(len(self.rows))):
            self._leave(i)
        return owners

    def _finish(self, i: int) -> Tuple[Any, DecodingResult]:
        row = self.rows[i]
        self._leave(i)
        return row.owner, row.result()

    def _leave(self, i: int) -> None:
        self.batch.leave(i)
        self.rows[i] = self.rows[-1]
        self.rows.pop()


def decode_windows(model, mels, options: DecodingOptions, *, tokenizer_path=None, max_rows: int = 8
                   ) -> List[DecodingResult]:
    """decode() of each window [n_mels, n_frames] in `mels`, as rows of one running batch of at most
    `max_rows`: a window that finishes makes room for the next at once, so no row idles while the
    batch's longest window finishes (as a fixed batch of windows does). The windows are encoded
    `max_rows` at a time, ahead of the rows that take them. Each result is decode()'s for that
    window alone. Needs options that join (see `joins`) and a model with row batches."""
    decoder = ContinuousDecoder(model, max_rows)
    decoder.batch.reserve(min(max_rows, len(mels)))  # the rows it will use, at once and until the end
    results: List[DecodingResult] = [None] * len(mels)  # type: ignore[list-item]
    encoded: List[Tuple[int, Any]] = []  # (window, its features) waiting for a row
    upcoming = 0
    while upcoming < len(mels) or encoded or decoder.rows:
        if not encoded and upcoming < len(mels) and decoder.free:
            group = range(upcoming, min(len(mels), upcoming + max_rows))
            features = model.encode(np.ascontiguousarray(np.stack([mels[i] for i in group]), dtype=np.float32))
            encoded = [(i, features.row(j) if len(group) > 1 else features) for j, i in enumerate(group)]
            upcoming = group.stop
        while encoded and decoder.free:
            i, features = encoded.pop(0)
            for index, result in decoder.join(features, options, tokenizer_path, i):
                results[index] = result
        if decoder.rows:
            for index, result in decoder.step():
                results[index] = result
    return results
