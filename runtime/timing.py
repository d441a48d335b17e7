"""Word-level timestamps: openai-whisper's whisper/timing.py in numpy.

A window's text tokens go through the decoder once more (the `cross_attention_scores` pass of
runtime.inference), and the cross-attention of the alignment heads says which audio frames each
token attends to. Per head the scores are softmaxed over the window's frames, standardized over
the tokens and median-filtered over time; their mean over heads is a token x frame similarity,
and dynamic time warping through it gives a monotonic token -> time path. Words start where the
path first reaches their first token.

Numerics follow openai-whisper: the weights are float32 as its torch tensors are, the DTW costs
accumulate in a float32 table from float64 inputs as its numba kernel does, and the rounding of
word times goes through numpy's round on float64, as its `round(np.float64, 2)` does.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from runtime.audio import HOP_LENGTH, SAMPLE_RATE, TOKENS_PER_SECOND
from runtime.inference import AudioFeatures, Inference
from runtime.tokenizer import Tokenizer

PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
SENTENCE_END_MARKS = ".。!！?？"


@dataclass
class WordTiming:
    word: str
    tokens: List[int]
    start: float
    end: float
    probability: float


def default_alignment_heads(n_text_layer: int, n_text_head: int) -> List[Tuple[int, int]]:
    """openai-whisper's heads when a model has no table entry: every head of the last half of the
    decoder layers (whisper/model.py, `all_heads[n_text_layer // 2:] = True`)."""
    return [(layer, head) for layer in range(n_text_layer // 2, n_text_layer) for head in range(n_text_head)]


def alignment_heads_of(model: Inference) -> List[Tuple[int, int]]:
    """[layer, head] pairs in (layer, head) order, as openai-whisper's sparse mask lists them."""
    heads = getattr(model, "alignment_heads", None)
    if heads is None:
        return default_alignment_heads(model.dims.n_text_layer, model.dims.n_text_head)
    return sorted((int(layer), int(head)) for layer, head in heads)


def median_filter(x: np.ndarray, filter_width: int) -> np.ndarray:
    """Median over a sliding window of odd `filter_width` along the last axis, reflect-padded
    (whisper.timing.median_filter). Inputs no longer than half the width come back unchanged."""
    pad_width = filter_width // 2
    if x.shape[-1] <= pad_width:
        return x
    if filter_width <= 0 or filter_width % 2 != 1:
        raise ValueError("`filter_width` should be an odd number")
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad_width, pad_width)], mode="reflect")
    windows = sliding_window_view(padded, filter_width, axis=-1)
    # partition, like torch's sort, orders NaN last
    return np.partition(windows, pad_width, axis=-1)[..., pad_width]


def dtw(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Cheapest monotonic path through the cost matrix x [N, M] (whisper.timing.dtw_cpu).

    Returns (row indices, column indices) along the path. Cell (i, j) extends the cheapest of
    its diagonal, upper and left neighbours; on ties openai's kernel prefers left, then up, which
    is kept. Cells on one anti-diagonal depend only on the two before it, so each anti-diagonal is
    one vectorized step; the table is stored skewed (row d holds the anti-diagonal i + j = d) so
    that the neighbours are contiguous slices.
    """
    x = np.asarray(x, dtype=np.float64)
    n, m = x.shape
    # skewed[d, i] = table[i, d - i]; costs are float32 as in openai's kernel
    cost = np.full((n + m + 1, n + 1), np.inf, dtype=np.float32)
    trace = np.full((n + m + 1, n + 1), -1, dtype=np.int8)
    cost[0, 0] = 0
    rows, cols = np.meshgrid(np.arange(1, n + 1), np.arange(1, m + 1), indexing="ij")
    skewed_x = np.zeros((n + m + 1, n + 1), dtype=np.float64)
    skewed_x[rows + cols, rows] = x
    for d in range(2, n + m + 1):
        lo, hi = max(1, d - m), min(n, d - 1)
        if lo > hi:
            continue
        c0 = cost[d - 2, lo - 1:hi]  # (i - 1, j - 1)
        c1 = cost[d - 1, lo - 1:hi]  # (i - 1, j)
        c2 = cost[d - 1, lo:hi + 1]  # (i, j - 1)
        take0 = (c0 < c1) & (c0 < c2)
        take1 = ~take0 & (c1 < c0) & (c1 < c2)
        step = np.where(take0, 0, np.where(take1, 1, 2)).astype(np.int8)
        best = np.where(take0, c0, np.where(take1, c1, c2))
        # float64 + float32, stored as float32: numba's `cost[i, j] = x[i-1, j-1] + c`
        cost[d, lo:hi + 1] = skewed_x[d, lo:hi + 1] + best.astype(np.float64)
        trace[d, lo:hi + 1] = step
    return _backtrace(trace, n, m)


def _backtrace(trace: np.ndarray, n: int, m: int) -> Tuple[np.ndarray, np.ndarray]:
    i, j = n, m
    path = []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        # the first row only moves left, the first column only up (openai sets them to 2 and 1)
        t = 2 if i == 0 else 1 if j == 0 else trace[i + j, i]
        if t == 0:
            i -= 1
            j -= 1
        elif t == 1:
            i -= 1
        elif t == 2:
            j -= 1
        else:
            raise ValueError("Unexpected trace[i, j]")
    result = np.array(path, dtype=np.int64).reshape(-1, 2)[::-1]
    return result[:, 0], result[:, 1]


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def find_alignment(model: Inference, tokenizer: Tokenizer, text_tokens: List[int], audio_features: AudioFeatures,
                   num_frames: int, *, alignment_heads: Optional[Sequence[Tuple[int, int]]] = None,
                   medfilt_width: int = 7, qk_scale: float = 1.0) -> List[WordTiming]:
    """Word timings (seconds from the window's start) of `text_tokens` decoded from one window.

    audio_features: the window's encoder output (batch 1); num_frames: mel frames of real audio
    in the window (the rest is padding, which the alignment ignores).
    """
    if len(text_tokens) == 0:
        return []
    sot_length = len(tokenizer.sot_sequence)
    tokens = np.array([*tokenizer.sot_sequence, tokenizer.no_timestamps, *text_tokens, tokenizer.eot], dtype=np.int64)
    heads = list(alignment_heads) if alignment_heads is not None else alignment_heads_of(model)
    logits, scores = model.cross_attention_scores(audio_features, tokens, heads)

    sampled_logits = np.asarray(logits[sot_length:, : tokenizer.eot], dtype=np.float64)
    token_probs = _softmax(sampled_logits)
    text_token_probs = token_probs[np.arange(len(text_tokens)), text_tokens].tolist()

    # heads x tokens x frames, over the frames of real audio only
    weights = np.asarray(scores, dtype=np.float32)[:, :, : num_frames // 2]
    weights = _softmax(weights * np.float32(qk_scale))
    std = weights.std(axis=-2, keepdims=True)
    mean = weights.mean(axis=-2, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        # a frame every token weighs alike (one frame left) gives NaN, silently, as in torch
        weights = (weights - mean) / std
    weights = median_filter(weights, medfilt_width)

    matrix = weights.mean(axis=0)[sot_length:-1]
    text_indices, time_indices = dtw(-matrix.astype(np.float64))

    words, word_tokens = tokenizer.split_to_word_tokens(text_tokens + [tokenizer.eot])
    if len(word_tokens) <= 1:
        # only the end of text: nothing to time
        return []
    word_boundaries = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))

    jumps = np.pad(np.diff(text_indices), (1, 0), constant_values=1).astype(bool)
    jump_times = time_indices[jumps] / TOKENS_PER_SECOND
    start_times = jump_times[word_boundaries[:-1]]
    end_times = jump_times[word_boundaries[1:]]
    word_probabilities = [np.mean(text_token_probs[i:j]) for i, j in zip(word_boundaries[:-1], word_boundaries[1:])]
    return [WordTiming(word, tokens, start, end, probability)
            for word, tokens, start, end, probability in zip(words, word_tokens, start_times, end_times,
                                                              word_probabilities)]


def merge_punctuations(alignment: List[WordTiming], prepended: str, appended: str) -> None:
    """Attach opening punctuation to the word after it and closing punctuation to the word before."""
    i = len(alignment) - 2
    j = len(alignment) - 1
    while i >= 0:
        previous = alignment[i]
        following = alignment[j]
        if previous.word.startswith(" ") and previous.word.strip() in prepended:
            following.word = previous.word + following.word
            following.tokens = previous.tokens + following.tokens
            previous.word = ""
            previous.tokens = []
        else:
            j = i
        i -= 1

    i = 0
    j = 1
    while j < len(alignment):
        previous = alignment[i]
        following = alignment[j]
        if not previous.word.endswith(" ") and following.word in appended:
            previous.word = previous.word + following.word
            previous.tokens = previous.tokens + following.tokens
            following.word = ""
            following.tokens = []
        else:
            i = j
        j += 1


def add_word_timestamps(*, segments: List[dict], model: Inference, tokenizer: Tokenizer,
                        audio_features: AudioFeatures, num_frames: int,
                        prepend_punctuations: str = PREPEND_PUNCTUATIONS,
                        append_punctuations: str = APPEND_PUNCTUATIONS,
                        last_speech_timestamp: float, **kwargs) -> None:
    """Give each segment of one window its "words" and tighten its start and end to them
    (whisper.timing.add_word_timestamps, with its heuristics for over-long words)."""
    if len(segments) == 0:
        return

    text_tokens_per_segment = [[token for token in segment["tokens"] if token < tokenizer.eot]
                               for segment in segments]
    text_tokens = list(itertools.chain.from_iterable(text_tokens_per_segment))
    alignment = find_alignment(model, tokenizer, text_tokens, audio_features, num_frames, **kwargs)
    word_durations = np.array([t.end - t.start for t in alignment])
    word_durations = word_durations[word_durations.nonzero()]
    median_duration = np.median(word_durations) if len(word_durations) > 0 else 0.0
    median_duration = min(0.7, float(median_duration))
    max_duration = median_duration * 2

    # a word at a sentence boundary may not be longer than twice the median word
    if len(word_durations) > 0:
        for i in range(1, len(alignment)):
            if alignment[i].end - alignment[i].start > max_duration:
                if alignment[i].word in SENTENCE_END_MARKS:
                    alignment[i].end = alignment[i].start + max_duration
                elif alignment[i - 1].word in SENTENCE_END_MARKS:
                    alignment[i].start = alignment[i].end - max_duration

    merge_punctuations(alignment, prepend_punctuations, append_punctuations)

    time_offset = segments[0]["seek"] * HOP_LENGTH / SAMPLE_RATE
    word_index = 0
    for segment, text_tokens in zip(segments, text_tokens_per_segment):
        saved_tokens = 0
        words = []
        while word_index < len(alignment) and saved_tokens < len(text_tokens):
            timing = alignment[word_index]
            if timing.word:
                words.append(dict(
                    word=timing.word,
                    # numpy's round of a float64, as openai's `round(np.float64, 2)`
                    start=float(round(np.float64(time_offset + timing.start), 2)),
                    end=float(round(np.float64(time_offset + timing.end), 2)),
                    probability=float(timing.probability),
                ))
            saved_tokens += len(timing.tokens)
            word_index += 1

        if len(words) > 0:
            # the first and second word after a pause may not be longer than twice the median word
            if words[0]["end"] - last_speech_timestamp > median_duration * 4 and (
                words[0]["end"] - words[0]["start"] > max_duration
                or (len(words) > 1 and words[1]["end"] - words[0]["start"] > max_duration * 2)
            ):
                if len(words) > 1 and words[1]["end"] - words[1]["start"] > max_duration:
                    boundary = max(words[1]["end"] / 2, words[1]["end"] - max_duration)
                    words[0]["end"] = words[1]["start"] = boundary
                words[0]["start"] = max(0, words[0]["end"] - max_duration)

            # prefer the segment's own start when its first word is too long
            if segment["start"] < words[0]["end"] and segment["start"] - 0.5 > words[0]["start"]:
                words[0]["start"] = max(0, min(words[0]["end"] - median_duration, segment["start"]))
            else:
                segment["start"] = words[0]["start"]

            # prefer the segment's own end when its last word is too long
            if segment["end"] > words[-1]["start"] and segment["end"] + 0.5 < words[-1]["end"]:
                words[-1]["end"] = max(words[-1]["start"] + median_duration, segment["end"])
            else:
                segment["end"] = words[-1]["end"]

            last_speech_timestamp = segment["end"]

        segment["words"] = words


def get_end(segments: List[dict]) -> Optional[float]:
    """End of the last word, else of the last segment (whisper.utils.get_end)."""
    return next((w["end"] for s in reversed(segments) for w in reversed(s["words"])),
                segments[-1]["end"] if segments else None)
