"""Decoding of 30 s windows, reproducing `whisper.decoding` in numpy.

The network runs behind the protocols of runtime/inference.py: `model.encode(mel)` gives the audio
features, `model.decoder(features, repeats=n_group)` opens a pass whose `prefill` takes the initial
tokens (returning the logits at the start-of-transcript index, for the no-speech probability, and
at the last index) and whose `step` appends one token per row. Everything else is here: the
initial tokens (prompt, sot sequence, prefix), the logit filters (SuppressBlank, SuppressTokens,
ApplyTimestampRules), greedy, sampling and beam search decoders, ranking, and the result fields.

Numerics follow openai-whisper: the cumulative log-probabilities accumulate in float32 as its
torch tensor does, and avg_logprob = sum / (len(tokens) + 1) in float64. Log-softmax and the
timestamp-rule comparison are computed in float64 (torch: float32), so a decision can only differ
from openai-whisper's when two values tie to within float32 rounding. The timestamp rule computes
the log-softmax's normalizer per row, then its values only where it looks (the timestamps), and hands
the normalizers to the token decoder, which reads the values of a few candidates (beam search) or of
the chosen token (greedy) from them: the same bits as the whole log-softmax would give there.

Sampling (temperature > 0) draws from softmax(logits / T) with a numpy Generator (Gumbel-max);
it is the same distribution as torch's `Categorical(logits=logits / T).sample()`, but not the same
random stream, so sampled outputs are not expected to equal openai-whisper's.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from runtime.host_threads import in_halves
from runtime.inference import AudioFeatures, DecoderSession, Inference
from runtime.tokenizer import Tokenizer, TokenizerError, get_tokenizer

CHUNK_LENGTH = 30  # seconds of audio per window (= runtime.audio.CHUNK_LENGTH)
NEG_INF = -np.inf
TASKS = ("transcribe", "translate", "lang_id")


class DecodingError(ValueError):
    """Invalid decoding options, or a decoding request the model cannot serve. One-line message."""


class UnsupportedOptionError(DecodingError, NotImplementedError):
    """An openai-whisper option this runtime does not implement (yet)."""


@dataclass(frozen=True)
class DecodingOptions:
    """Same fields and defaults as `whisper.DecodingOptions`."""

    # "transcribe" (X -> X), "translate" (X -> English) or "lang_id" (detect the language only)
    task: str = "transcribe"
    # language of the audio; detected when None
    language: Optional[str] = None

    # sampling
    temperature: float = 0.0
    sample_len: Optional[int] = None  # most tokens to sample; n_text_ctx // 2 when None
    best_of: Optional[int] = None  # independent samples when temperature > 0
    beam_size: Optional[int] = None  # beams when temperature == 0
    patience: Optional[float] = None  # beam search patience (arxiv:2204.05424)

    # "alpha" of Google NMT's length penalty for ranking; None: divide by the length
    length_penalty: Optional[float] = None

    # previous-context text or tokens (after <|startofprev|>), and a prefix of the current text
    prompt: Optional[Union[str, List[int]]] = None
    prefix: Optional[Union[str, List[int]]] = None

    # token ids (or comma-separated ids) to suppress; "-1" means tokenizer.non_speech_tokens
    suppress_tokens: Optional[Union[str, Iterable[int]]] = "-1"
    suppress_blank: bool = True  # suppress a blank (" " or EOT) first token

    # timestamps
    without_timestamps: bool = False  # use <|notimestamps|> and sample text tokens only
    max_initial_timestamp: Optional[float] = 1.0

    # openai-whisper's precision switch; accepted for compatibility, the engine decides precision
    fp16: bool = True


@dataclass(frozen=True)
class DecodingResult:
    """Like `whisper.DecodingResult` (without the per-window audio features), plus sum_logprob."""

    language: str
    language_probs: Optional[Dict[str, float]] = None
    tokens: List[int] = field(default_factory=list)
    text: str = ""
    avg_logprob: float = np.nan
    no_speech_prob: float = np.nan
    temperature: float = np.nan
    compression_ratio: float = np.nan
    sum_logprob: float = np.nan


def compression_ratio(text: str) -> float:
    """UTF-8 length over zlib-compressed length (high for repetitive text)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data))


# ---------------------------------------------------------------------------- numerics


_CACHED_WORK_BYTES = 1 << 20  # float64 work a host thread computes in at a time (within its L2)


def _log_softmax_terms(logits: np.ndarray, work: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """float64 peak and log_total, [..., 1] each, such that log_softmax(x) = (x - peak) - log_total.

    The one place the normalizer is computed, so that the fast paths get log_softmax's bits from
    _log_softmax_at without the whole row. work: a float64 array of logits' shape to compute in
    (overwritten), from a _WorkArray.
    """
    if work is None:
        work = np.empty(np.shape(logits), dtype=np.float64)
    if np.ndim(logits) != 2:
        return _log_softmax_terms_of(logits, work)
    peak = np.empty((len(logits), 1), dtype=np.float64)
    log_total = np.empty_like(peak)
    # A few rows at a time, each block's float64 values in the same first rows of the thread's part of
    # `work`, which stay in cache: the whole array (40 rows: 17 MB, after a step that streamed the weights
    # through the cache) went to memory and back, at twice the time. Each row's values are computed by
    # the same calls on the same row whatever the block (numpy's row reductions do not depend on the other rows).
    block = max(1, _CACHED_WORK_BYTES // (8 * max(1, logits.shape[-1])))

    def rows(start: int, stop: int) -> None:
        for first in range(start, stop, block):
            last = min(stop, first + block)
            peak[first:last], log_total[first:last] = _log_softmax_terms_of(
                logits[first:last], work[start:start + last - first])

    in_halves(len(logits), rows)  # the other core computes half of the rows
    return peak, log_total


def _log_softmax_terms_of(logits: np.ndarray, work: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        # the peak of the float32 logits is the float64 copy's, exactly; the subtraction widens them as
        # it goes (one pass over the vocabulary instead of a copy, a float64 max and a subtraction)
        peak = np.max(logits, axis=-1, keepdims=True).astype(np.float64)
        np.subtract(logits, peak, out=work)
        np.exp(work, out=work)
        return peak, np.log(np.sum(work, axis=-1, keepdims=True))


def _log_softmax_at(logits: np.ndarray, peak: np.ndarray, log_total: np.ndarray) -> np.ndarray:
    """log_softmax's float64 values for some of a row's logits (any subset, same peak and log_total).

    It never decreases as the logit grows (each operation rounds monotonically), so the order of
    the logits is the order of their log-probabilities, up to ties.
    """
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return (np.asarray(logits, dtype=np.float64) - peak) - log_total


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis; rows that are all -inf give nan (as torch)."""
    peak, log_total = _log_softmax_terms(logits)
    return _log_softmax_at(logits, peak, log_total)


def logsumexp(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return NEG_INF
    m = np.max(x)
    if not np.isfinite(m):
        return float(m)
    return float(m + np.log(np.sum(np.exp(x - m))))


def _logsumexp_rows(x: np.ndarray) -> np.ndarray:
    """logsumexp of each row of a float64 x [batch, n > 0], as [batch, 1]: the same operations, so
    the same values (numpy's exp, log and row sums do not depend on the array's shape)."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m = np.max(x, axis=-1, keepdims=True)
        total = np.sum(np.exp(x - m), axis=-1, keepdims=True)
        return np.where(np.isfinite(m), m + np.log(total), m)


class _WorkArray:
    """A vocabulary-sized work array kept from one decoding step to the next: a fresh temporary of
    a few MB each step costs more in page faults than the arithmetic done in it. Fewer rows than
    it holds (a batch whose finished audios left) get its first rows."""

    def __init__(self):
        self._array: Optional[np.ndarray] = None

    def __call__(self, shape: Tuple[int, ...], dtype=np.float64) -> np.ndarray:
        array = self._array
        if (array is None or array.dtype != dtype or array.shape[1:] != tuple(shape[1:])
                or not 0 < shape[0] <= array.shape[0]):
            self._array = array = np.empty(shape, dtype=dtype)
        return array[:shape[0]]


class _StepNormalizers:
    """One step's float64 log-softmax terms (_log_softmax_terms), handed from the timestamp rule, which
    computes them for every row, to the token decoder, which needs them for the same logits after the rule
    (beam search's candidates, greedy decoding's chosen token): a second pass of exp over the vocabulary
    saved each step (beam search, 5 rows: ~0.5 ms; greedy, 1 row: ~50 us). The rows whose
    text the rule then masked are computed again; the others are the same values the decoder would
    compute (the same function on the same row: numpy's row reductions do not depend on other rows)."""

    def __init__(self):
        self._logits: Optional[np.ndarray] = None

    def keep(self, logits: np.ndarray, peak: np.ndarray, log_total: np.ndarray, changed: np.ndarray) -> None:
        """The terms of `logits` as they were before the rows `changed` (a boolean row mask) were changed."""
        self._logits, self._peak, self._log_total, self._changed = logits, peak, log_total, changed

    def holds(self, logits: np.ndarray) -> bool:
        """Whether terms were kept for this very array (the timestamp rule ran on it)."""
        return self._logits is logits

    def terms(self, logits: np.ndarray, work: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """_log_softmax_terms(logits, work), from what was kept for this very array where there is."""
        kept, self._logits = self._logits, None  # used once: the next step's logits are another array
        if kept is not logits:
            return _log_softmax_terms(logits, work)
        peak, log_total = self._peak, self._log_total
        rows = np.flatnonzero(self._changed)
        if rows.size:
            peak[rows], log_total[rows] = _log_softmax_terms(logits[rows], work[:rows.size])
        return peak, log_total


def _chosen_logprobs(logits: np.ndarray, chosen: np.ndarray, work: Optional[np.ndarray] = None) -> np.ndarray:
    """log_softmax(logits)[row, chosen[row]] as float32, without the full log-softmax.

    Greedy decoding needs one log-probability per row: logit - logsumexp(row). Where the timestamp
    rule ran on the logits it reads the rule's float64 terms instead (GreedyDecoder.update); here,
    without timestamps: float64 sums, as log_softmax's, but only one pass of float32 exp over the
    vocabulary (the full float64 log-softmax cost ~1 ms a row, as much as a decoder step for a batch
    of six). work: an array of logits' shape and dtype to compute in (overwritten), from a _WorkArray.
    """
    rows = np.arange(logits.shape[0])
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        peak = logits.max(axis=-1, keepdims=True)
        shifted = np.subtract(logits, peak, out=work)
        total = np.exp(shifted, out=shifted).sum(axis=-1, dtype=np.float64)
        logsumexp = peak[:, 0].astype(np.float64) + np.log(total)
        return (logits[rows, chosen].astype(np.float64) - logsumexp).astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        return np.exp(log_softmax(logits))


# ---------------------------------------------------------------------------- language detection


def _as_features(model: Inference, audio) -> Tuple[AudioFeatures, bool]:
    """Encode a mel [n_mels, n_frames] or [batch, n_mels, n_frames]; pass audio features through."""
    if isinstance(audio, np.ndarray):
        mel = np.asarray(audio, dtype=np.float32)
        single = mel.ndim == 2
        if single:
            mel = mel[None]
        if mel.ndim != 3 or mel.shape[1] != model.dims.n_mels or mel.shape[2] != 2 * model.dims.n_audio_ctx:
            raise DecodingError(
                f"mel must have shape [batch,] {model.dims.n_mels} x {2 * model.dims.n_audio_ctx}, got {audio.shape}"
            )
        return model.encode(np.ascontiguousarray(mel)), single
    return audio, False


def _default_tokenizer_path(model: Inference, tokenizer_path):
    if tokenizer_path is not None:
        return tokenizer_path
    path = getattr(model, "tokenizer_path", None)
    if path is None:
        raise DecodingError("no tokenizer: pass tokenizer_path (the model's .tiktoken vocabulary)")
    return path


def _detect_language_features(model: Inference, features: AudioFeatures, tokenizer: Tokenizer
                              ) -> Tuple[np.ndarray, List[Dict[str, float]]]:
    if tokenizer.language is None or tokenizer.language_token not in tokenizer.sot_sequence:
        raise DecodingError("This model doesn't have language tokens so it can't perform lang id")
    n_audio = features.batch_size
    session = model.decoder(features, repeats=1)
    sot = np.full((n_audio, 1), tokenizer.sot, dtype=np.int64)
    logits = np.array(session.prefill(sot, positions=[0])[:, 0], dtype=np.float32)  # [n_audio, n_vocab]
    language_ids = np.asarray(tokenizer.all_language_tokens, dtype=np.int64)
    masked = np.full_like(logits, NEG_INF)
    masked[:, language_ids] = logits[:, language_ids]
    tokens = masked.argmax(axis=-1)
    probs = softmax(masked)[:, language_ids].astype(np.float32)
    codes = tokenizer.all_language_codes
    language_probs = [{code: float(p) for code, p in zip(codes, row)} for row in probs]
    return tokens, language_probs


def detect_language(model: Inference, mel, tokenizer: Optional[Tokenizer] = None, *,
                    tokenizer_path=None):
    """Most probable language token and the probabilities of all languages, per window.

    mel: float32 [n_mels, n_frames] (returns a token id and one dict) or [batch, n_mels, n_frames]
    (returns an array of ids and a list of dicts), or AudioFeatures from `model.encode`. The decoder
    runs on <|startoftranscript|> alone and all non-language tokens are masked, as
    `whisper.decoding.detect_language` does.
    """
    if tokenizer is None:
        tokenizer = get_tokenizer(_default_tokenizer_path(model, tokenizer_path), model.is_multilingual,
                                  num_languages=model.num_languages)
    if tokenizer.language is None or tokenizer.language_token not in tokenizer.sot_sequence:
        raise DecodingError("This model doesn't have language tokens so it can't perform lang id")
    features, single = _as_features(model, mel)
    tokens, probs = _detect_language_features(model, features, tokenizer)
    if single:
        return int(tokens[0]), probs[0]
    return tokens, probs


# ---------------------------------------------------------------------------- logit filters


class LogitFilter:
    def apply(self, logits: np.ndarray, tokens: np.ndarray) -> None:
        """Mask `logits` [batch, n_vocab] in place given the `tokens` [batch, length] so far."""
        raise NotImplementedError


class SuppressBlank(LogitFilter):
    """At the first sampled position, forbid a blank (" ") and EOT."""

    def __init__(self, tokenizer: Tokenizer, sample_begin: int):
        self.sample_begin = sample_begin
        self.blank = list(tokenizer.encode_fixed(" ")) + [tokenizer.eot]

    def apply(self, logits: np.ndarray, tokens: np.ndarray) -> None:
        if tokens.shape[1] == self.sample_begin:
            logits[:, self.blank] = NEG_INF


class SuppressTokens(LogitFilter):
    def __init__(self, suppress_tokens: Sequence[int]):
        self.suppress_tokens = np.asarray(list(suppress_tokens), dtype=np.int64)

    def apply(self, logits: np.ndarray, tokens: np.ndarray) -> None:
        if self.suppress_tokens.size:
            logits[:, self.suppress_tokens] = NEG_INF


class ApplyTimestampRules(LogitFilter):
    """Whisper's timestamp grammar.

    - <|notimestamps|> is never sampled.
    - Timestamps come in pairs (end, start), except a single one right before EOT: after a pair (or
      at the start) the next token is text; after a lone timestamp it is a timestamp or EOT.
    - Timestamps never decrease, and a segment has a nonzero length.
    - The first sampled token is a timestamp no later than `max_initial_timestamp_index`.
    - When the timestamps together are more probable than any single text token, sample a timestamp.
    """

    def __init__(self, tokenizer: Tokenizer, sample_begin: int, max_initial_timestamp_index: Optional[int],
                 normalizers: Optional[_StepNormalizers] = None):
        self.tokenizer = tokenizer
        self.sample_begin = sample_begin
        self.max_initial_timestamp_index = max_initial_timestamp_index
        self.normalizers = normalizers  # where the last rule's log-softmax terms go (the token decoder's)
        self._work = _WorkArray()

    def apply(self, logits: np.ndarray, tokens: np.ndarray) -> None:
        begin = self.tokenizer.timestamp_begin
        logits[:, self.tokenizer.no_timestamps] = NEG_INF
        self._follow_sampled_timestamps(logits, tokens)

        if tokens.shape[1] == self.sample_begin:
            logits[:, :begin] = NEG_INF  # start with a timestamp
            if self.max_initial_timestamp_index is not None:
                logits[:, begin + self.max_initial_timestamp_index + 1:] = NEG_INF

        self._prefer_probable_timestamps(logits)

    def _follow_sampled_timestamps(self, logits: np.ndarray, tokens: np.ndarray) -> None:
        """The pair and order rules, for all rows at once (they have sampled as many tokens)."""
        begin = self.tokenizer.timestamp_begin
        sampled = tokens[:, self.sample_begin:]
        n_sampled = sampled.shape[1]
        if n_sampled == 0:
            return
        is_timestamp = sampled >= begin
        last_was_timestamp = is_timestamp[:, -1]
        penultimate_was_timestamp = is_timestamp[:, -2] if n_sampled >= 2 else np.ones_like(last_was_timestamp)
        lone = last_was_timestamp & ~penultimate_was_timestamp
        # a pair just closed (or it opened the text): text next; a lone timestamp: a timestamp or EOT next
        logits[last_was_timestamp & penultimate_was_timestamp, begin:] = NEG_INF
        logits[lone, :self.tokenizer.eot] = NEG_INF

        # no going back in time; a new segment must start after the last one ended
        last_at = n_sampled - 1 - np.argmax(is_timestamp[:, ::-1], axis=1)
        last_timestamp = sampled[np.arange(sampled.shape[0]), last_at]
        first_allowed = np.where(lone, last_timestamp, last_timestamp + 1)
        first_allowed[~is_timestamp.any(axis=1)] = begin  # no timestamp yet: nothing to mask
        stamp_ids = np.arange(begin, logits.shape[1])
        logits[:, begin:][stamp_ids < first_allowed[:, None]] = NEG_INF

    def _prefer_probable_timestamps(self, logits: np.ndarray) -> None:
        """Where logsumexp(logprobs[timestamps]) > max(logprobs[text]), mask the text: decided on
        log_softmax's float64 values, as openai-whisper's rule on its float32 ones."""
        begin = self.tokenizer.timestamp_begin
        if begin >= logits.shape[1]:  # no timestamp tokens: their logsumexp is -inf
            return
        peak, log_total = _log_softmax_terms(logits, self._work(logits.shape))
        timestamps = _logsumexp_rows(_log_softmax_at(logits[:, begin:], peak, log_total))
        # log_softmax is monotonic in the logit: the best text log-probability is the best text logit's
        best_text = _log_softmax_at(np.max(logits[:, :begin], axis=-1, keepdims=True), peak, log_total)
        masked = (timestamps > best_text)[:, 0]
        logits[masked, :begin] = NEG_INF
        if self.normalizers is not None:  # the last rule: nothing changes the logits after it but this mask
            self.normalizers.keep(logits, peak, log_total, masked)


# ---------------------------------------------------------------------------- token decoders


class TokenDecoder:
    def reset(self) -> None:
        """Forget the state of a previous decoding."""

    def update(self, tokens: np.ndarray, logits: np.ndarray, sum_logprobs: np.ndarray
               ) -> Tuple[np.ndarray, bool]:
        """Append the next token of each row; sum_logprobs (float32 [batch]) is updated in place.

        Returns the new tokens [batch, length + 1] and whether every sequence has finished.
        """
        raise NotImplementedError

    def finalize(self, tokens: np.ndarray, sum_logprobs: np.ndarray
                 ) -> Tuple[List[List[np.ndarray]], List[List[float]]]:
        """Candidates per audio (tokens [n_audio, n_group, length], sum_logprobs [n_audio, n_group])."""
        raise NotImplementedError


class GreedyDecoder(TokenDecoder):
    """Argmax at temperature 0, otherwise a sample from softmax(logits / temperature)."""

    def __init__(self, temperature: float, eot: int, rng: Optional[np.random.Generator] = None,
                 normalizers: Optional[_StepNormalizers] = None):
        self.temperature = float(temperature)
        self.eot = eot
        self.rng = rng
        self.normalizers = normalizers  # the timestamp rule's log-softmax terms of the same logits
        self._work = _WorkArray()

    def _sample(self, logits: np.ndarray) -> np.ndarray:
        if self.temperature == 0:
            return logits.argmax(axis=-1)
        if self.rng is None:
            self.rng = np.random.default_rng()
        # Gumbel-max: argmax(logits / T + Gumbel noise) is a draw from softmax(logits / T)
        scaled = logits.astype(np.float64) / self.temperature
        return (scaled + self.rng.gumbel(size=scaled.shape)).argmax(axis=-1)

    def update(self, tokens, logits, sum_logprobs):
        next_tokens = self._sample(logits).astype(np.int64)
        if self.normalizers is not None and self.normalizers.holds(logits):
            # the rule's float64 terms: the chosen tokens' log_softmax values without another pass of exp
            peak, log_total = self.normalizers.terms(logits, self._work(logits.shape))
            chosen = logits[np.arange(len(logits)), next_tokens][:, None]
            current = _log_softmax_at(chosen, peak, log_total)[:, 0].astype(np.float32)
        else:
            current = _chosen_logprobs(logits, next_tokens, self._work(logits.shape, logits.dtype))
        running = tokens[:, -1] != self.eot
        sum_logprobs[running] += current[running]

        next_tokens[~running] = self.eot
        tokens = np.concatenate([tokens, next_tokens[:, None]], axis=-1)
        completed = bool((tokens[:, -1] == self.eot).all())
        return tokens, completed

    def finalize(self, tokens, sum_logprobs):
        # every sequence ends with at least one EOT
        eot = np.full(tokens.shape[:-1] + (1,), self.eot, dtype=tokens.dtype)
        tokens = np.concatenate([tokens, eot], axis=-1)
        return [list(group) for group in tokens], [[float(x) for x in row] for row in sum_logprobs]


def _top_k(row: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, largest first, equal values by index: the same as
    np.argsort(-row, kind="stable")[:k] without sorting the whole vocabulary."""
    threshold = row[np.argpartition(-row, k - 1)[:k]].min() if k < row.size else np.nan
    if np.isnan(threshold):  # a nan (all -inf logits) or a short row: sort it all
        return np.argsort(-row, kind="stable")[:k]
    candidates = np.flatnonzero(row >= threshold)  # every value tied with the k-th is kept
    return candidates[np.argsort(-row[candidates], kind="stable")][:k]


def _best_tokens(logits: np.ndarray, k: int, work: Optional[np.ndarray] = None,
                 normalizers: Optional[_StepNormalizers] = None) -> Tuple[List[List[int]], List[np.ndarray]]:
    """Per row, the ids `_top_k(log_softmax(row).astype(np.float32), k)` and their float32 log-probabilities."""
    if normalizers is not None and work is not None:
        peak, log_total = normalizers.terms(logits, work)
    else:
        peak, log_total = _log_softmax_terms(logits, work)
    best_ids, best_logprobs = [], []
    for row, row_peak, row_log_total in zip(logits, peak[:, 0], log_total[:, 0]):
        best = _top_k_of_largest_logits(row, k, row_peak, row_log_total)
        ids, logprobs = best if best is not None else _top_k_logprobs(row, k, row_peak, row_log_total)
        best_ids.append(ids)
        best_logprobs.append(logprobs)
    return best_ids, best_logprobs


def _top_k_logprobs(row: np.ndarray, k: int, peak: np.float64, log_total: np.float64
                    ) -> Tuple[List[int], np.ndarray]:
    """_best_tokens for one row the long way: its whole float32 log-softmax, then _top_k."""
    logprobs = _log_softmax_at(row, peak, log_total).astype(np.float32)
    ids = _top_k(logprobs, k)
    return ids.tolist(), logprobs[ids]


def _top_k_of_largest_logits(row: np.ndarray, k: int, peak: np.float64, log_total: np.float64
                             ) -> Optional[Tuple[List[int], np.ndarray]]:
    """_top_k_logprobs from the log-probabilities of the row's largest logits alone, or None where
    they cannot be shown to hold the k best (ties across the cut, fewer than k + 1 finite logits, nan).

    float32((x - peak) - log_total) never decreases as x grows, so every logit left out has at
    most the smallest log-probability of those kept: the k best are among them when the k-th best
    is strictly above that smallest.
    """
    ids = _largest_logits(row, peak, 2 * k)
    logprobs = _log_softmax_at(row[ids], peak, log_total).astype(np.float32)
    order = np.argsort(-logprobs, kind="stable")  # ids ascending: equal values by id, as _top_k
    ids, logprobs = ids[order], logprobs[order]
    if not (ids.size > k and logprobs[k - 1] > logprobs[-1]):
        return None
    return ids[:k].tolist(), logprobs[:k]


def _largest_logits(row: np.ndarray, peak: np.float64, n: int) -> np.ndarray:
    """Ids, ascending, of n of the row's largest logits (those within 48 of the peak where fewer),
    such that no logit left out is larger than one kept.

    Found by threshold rather than by np.argpartition over the row, which costs several times
    more, mostly in page faults on its vocabulary-sized index array.
    """
    for spread in (12.0, 24.0, 48.0):  # beam 5 (n = 12) on real audio: 12 for 97% of the rows, else 24
        ids = np.flatnonzero(row >= np.float32(peak - spread))
        if ids.size >= n:
            break
    if ids.size > n:  # keep the n largest; the others are no larger than the smallest of them
        ids = np.sort(ids[np.argpartition(row[ids], ids.size - n)[ids.size - n:]])
    return ids


def _extend_rows(tokens: np.ndarray, rows: List[int], next_ids: List[int]) -> np.ndarray:
    """tokens[rows] with next_ids appended, int64 [len(rows), length + 1]."""
    if not rows:  # no beam kept (an empty batch): no rows, as np.asarray([]) of no sequences
        return np.asarray([], dtype=np.int64)
    return np.concatenate([tokens[rows].astype(np.int64, copy=False),
                           np.asarray(next_ids, dtype=np.int64)[:, None]], axis=1)


class BeamSearchDecoder(TokenDecoder):
    """Beam search as openai-whisper's: beam_size live beams per audio, each extended by its
    beam_size + 1 best tokens; finished sequences are collected until round(beam_size * patience)."""

    def __init__(self, beam_size: int, eot: int, session_reorder, patience: Optional[float] = None,
                 normalizers: Optional[_StepNormalizers] = None, drops_rows: bool = False):
        self.beam_size = beam_size
        self.normalizers = normalizers
        self.eot = eot
        self.reorder = session_reorder
        self.patience = patience or 1.0
        self.max_candidates = round(beam_size * self.patience)
        # An audio whose candidates are complete changes no more (openai-whisper keeps stepping its
        # beams until every audio of the batch is done, and never reads them): its rows leave the
        # batch, where the session can drop rows (session_reorder given fewer rows than it has). Not
        # with patience < 1, where finalize reads a done audio's last beams.
        self.drops_rows = drops_rows and self.max_candidates >= beam_size
        self.finished_sequences: Optional[List[Dict[tuple, float]]] = None
        self.active: List[int] = []  # the audio (index in the batch) of each beam_size rows, in order
        self._work = _WorkArray()
        if self.max_candidates <= 0:
            raise DecodingError(f"Invalid beam size ({beam_size}) or patience ({patience})")

    def reset(self):
        self.finished_sequences = None

    def update(self, tokens, logits, sum_logprobs):
        """As TokenDecoder.update; where audios finish and their rows leave the batch, the returned tokens
        have fewer rows, and sum_logprobs' first rows are theirs (the caller keeps those)."""
        if tokens.shape[0] % self.beam_size != 0:
            raise DecodingError(f"batch {tokens.shape[0]} is not a multiple of beam_size {self.beam_size}")
        n_audio = tokens.shape[0] // self.beam_size
        if self.finished_sequences is None:
            self.finished_sequences = [{} for _ in range(n_audio)]
            self.active = list(range(n_audio))

        best_ids, best_logprobs = _best_tokens(logits, self.beam_size + 1, self._work(logits.shape), self.normalizers)
        source_indices, next_ids, finished_sequences = [], [], []
        new_sum = sum_logprobs.copy()
        for i in range(n_audio):
            rows = range(i * self.beam_size, (i + 1) * self.beam_size)
            candidates = self._candidates(tokens, rows, best_ids, best_logprobs, sum_logprobs)
            finished = {}
            saved = 0
            for prefix_row, token in sorted(candidates, key=lambda c: candidates[c][0], reverse=True):
                score, source = candidates[prefix_row, token]
                if token == self.eot:
                    finished[tuple(tokens[prefix_row].tolist()) + (token,)] = score
                else:
                    new_sum[len(source_indices)] = score
                    source_indices.append(source)
                    next_ids.append(token)
                    saved += 1
                    if saved == self.beam_size:
                        break
            finished_sequences.append(finished)

        for audio, newly in zip(self.active, finished_sequences):
            previously = self.finished_sequences[audio]
            for sequence in sorted(newly, key=newly.get, reverse=True):
                if len(previously) >= self.max_candidates:
                    break
                previously[sequence] = newly[sequence]
        completed = all(len(s) >= self.max_candidates for s in self.finished_sequences)

        done = [len(self.finished_sequences[audio]) >= self.max_candidates for audio in self.active]
        if self.drops_rows and any(done) and not completed:
            kept = [j for j in range(len(source_indices)) if not done[j // self.beam_size]]
            source_indices = [source_indices[j] for j in kept]
            next_ids = [next_ids[j] for j in kept]
            new_sum = new_sum[kept]
            self.active = [audio for audio, finished in zip(self.active, done) if not finished]
        n_rows = tokens.shape[0]
        sum_logprobs[:len(new_sum)] = new_sum
        tokens = _extend_rows(tokens, source_indices, next_ids)
        if len(source_indices) < n_rows or source_indices != list(range(n_rows)):
            self.reorder(source_indices)
        return tokens, completed

    @staticmethod
    def _candidates(tokens, rows, best_ids, best_logprobs, sum_logprobs) -> Dict[Tuple[int, int], Tuple[float, int]]:
        """One audio's extensions, in openai-whisper's order: (prefix_row, token) -> (score, source row).

        openai-whisper keys them by the whole extended sequence, so rows with the same tokens (all
        of them at the first step) extend one prefix: a sequence keeps the place of its first
        extension and the score and source of its last. prefix_row, the first row with the prefix,
        names the sequence instead, without building (beam_size + 1) * beam_size long tuples.
        """
        first_row_with = {}
        candidates = {}
        for row in rows:
            prefix_row = first_row_with.setdefault(tokens[row].tobytes(), row)
            # float32 sums, as openai-whisper's torch tensors: numpy scalar adds, sum first (a vector
            # add may swap the operands, which changes which nan comes out when both are nan)
            row_sum = np.float32(sum_logprobs[row])
            for token, logprob in zip(best_ids[row], best_logprobs[row]):
                candidates[prefix_row, token] = (float(row_sum + logprob), row)
        return candidates

    def finalize(self, preceding_tokens, sum_logprobs):
        """preceding_tokens [audios in the batch, beam_size, length] and their sum_logprobs: the audios of
        self.active (those whose rows left the batch have all their candidates)."""
        for audio, sequences in enumerate(self.finished_sequences):
            if len(sequences) < self.beam_size:  # not enough finished: add the best unfinished
                i = self.active.index(audio)
                for j in list(np.argsort(sum_logprobs[i], kind="stable"))[::-1]:
                    sequence = tuple(int(t) for t in preceding_tokens[i, j]) + (self.eot,)
                    sequences[sequence] = float(sum_logprobs[i][j])
                    if len(sequences) >= self.beam_size:
                        break
        tokens = [[np.asarray(s, dtype=np.int64) for s in sequences] for sequences in self.finished_sequences]
        sum_lp = [list(sequences.values()) for sequences in self.finished_sequences]
        return tokens, sum_lp


class MaximumLikelihoodRanker:
    """Pick the candidate with the best sum_logprob / penalty, where penalty is the length, or
    ((5 + length) / 6) ** length_penalty (Google NMT) when length_penalty is given."""

    def __init__(self, length_penalty: Optional[float]):
        self.length_penalty = length_penalty

    def rank(self, tokens: List[List[np.ndarray]], sum_logprobs: List[List[float]]) -> List[int]:
        def scores(logprobs, lengths):
            out = []
            for logprob, length in zip(logprobs, lengths):
                penalty = length if self.length_penalty is None else ((5 + length) / 6) ** self.length_penalty
                out.append(logprob / penalty)
            return out

        lengths = [[len(t) for t in group] for group in tokens]
        return [int(np.argmax(scores(p, l))) for p, l in zip(sum_logprobs, lengths)]


# ---------------------------------------------------------------------------- the task


def verify_options(options: DecodingOptions) -> DecodingOptions:
    """DecodingError (one line) for option combinations openai-whisper rejects, or that are malformed."""
    if options.task not in TASKS:
        raise DecodingError(f"task must be one of {', '.join(TASKS)}, got {options.task!r}")
    if options.beam_size is not None and options.best_of is not None:
        raise DecodingError("beam_size and best_of can't be given together")
    if options.temperature == 0 and options.best_of is not None:
        raise DecodingError("best_of with greedy sampling (T=0) is not compatible")
    if options.patience is not None and options.beam_size is None:
        raise DecodingError("patience requires beam_size to be given")
    if options.length_penalty is not None and not (0 <= options.length_penalty <= 1):
        raise DecodingError("length_penalty (alpha) should be a value between 0 and 1")
    if not np.isfinite(options.temperature) or options.temperature < 0:
        raise DecodingError(f"temperature must be a finite number >= 0, got {options.temperature!r}")
    for name in ("sample_len", "best_of", "beam_size"):
        value = getattr(options, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise DecodingError(f"{name} must be a positive integer or None, got {value!r}")
    if options.patience is not None and not np.isfinite(options.patience):
        raise DecodingError(f"patience must be a finite number, got {options.patience!r}")
    if options.beam_size is not None and round(options.beam_size * (options.patience or 1.0)) <= 0:
        # openai-whisper asserts this in BeamSearchDecoder: beam search must keep a candidate
        raise DecodingError(f"Invalid beam size ({options.beam_size}) or patience ({options.patience})")
    return options


def rows_per_audio(options: DecodingOptions) -> int:
    """Decoder rows one audio takes: its beams, its best-of samples, or one."""
    return options.beam_size or options.best_of or 1


class DecodingTask:
    """Decoding of a batch of windows with one set of options (openai-whisper's DecodingTask)."""

    def __init__(self, model: Inference, options: DecodingOptions, *, tokenizer_path=None,
                 rng: Optional[np.random.Generator] = None):
        self.model = model
        self.options = verify_options(options)
        path = _default_tokenizer_path(model, tokenizer_path)
        try:
            self.tokenizer: Tokenizer = get_tokenizer(
                path, model.is_multilingual, num_languages=model.num_languages,
                language=options.language or "en", task=options.task)
        except TokenizerError as e:
            raise DecodingError(str(e)) from e

        self.n_group: int = rows_per_audio(options)
        self.n_ctx: int = model.dims.n_text_ctx
        self.sample_len: int = options.sample_len or model.dims.n_text_ctx // 2

        self.sot_sequence: Tuple[int, ...] = self.tokenizer.sot_sequence
        if options.without_timestamps:
            self.sot_sequence = self.tokenizer.sot_sequence_including_notimestamps

        self.initial_tokens: Tuple[int, ...] = self._initial_tokens()
        self.sample_begin: int = len(self.initial_tokens)
        self.sot_index: int = self.initial_tokens.index(self.tokenizer.sot)
        if self.sample_begin >= self.n_ctx:
            raise DecodingError(f"{self.sample_begin} initial tokens leave no room in the {self.n_ctx}-token context")

        self.ranker = MaximumLikelihoodRanker(options.length_penalty)
        self.rng = rng

        # the timestamp rule's log-softmax terms, for the token decoder's update on the same logits
        self.normalizers = _StepNormalizers()
        self.logit_filters: List[LogitFilter] = []
        if options.suppress_blank:
            self.logit_filters.append(SuppressBlank(self.tokenizer, self.sample_begin))
        if options.suppress_tokens:
            self.logit_filters.append(SuppressTokens(self._suppress_tokens()))
        if not options.without_timestamps:
            precision = CHUNK_LENGTH / model.dims.n_audio_ctx  # 0.02 s per timestamp step
            max_initial_timestamp_index = None
            if options.max_initial_timestamp:
                max_initial_timestamp_index = round(options.max_initial_timestamp / precision)
            self.logit_filters.append(
                ApplyTimestampRules(self.tokenizer, self.sample_begin, max_initial_timestamp_index, self.normalizers))

    def _encode_text(self, text: Union[str, Sequence[int]]) -> List[int]:
        if isinstance(text, str):
            return self.tokenizer.encode(" " + text.strip())
        return [int(t) for t in text]

    def _initial_tokens(self) -> Tuple[int, ...]:
        tokens = list(self.sot_sequence)
        if self.options.prefix:
            prefix_tokens = self._encode_text(self.options.prefix)
            if self.sample_len is not None:
                max_prefix_len = self.n_ctx // 2 - self.sample_len
                prefix_tokens = prefix_tokens[-max_prefix_len:]
            tokens = tokens + prefix_tokens
        if self.options.prompt:
            prompt_tokens = self._encode_text(self.options.prompt)
            tokens = [self.tokenizer.sot_prev] + prompt_tokens[-(self.n_ctx // 2 - 1):] + tokens
        return tuple(tokens)

    def _suppress_tokens(self) -> Tuple[int, ...]:
        suppress = self.options.suppress_tokens
        if isinstance(suppress, str):
            try:
                suppress = [int(t) for t in suppress.split(",")]
            except ValueError:
                raise DecodingError(f"suppress_tokens must be comma-separated integers, got {suppress!r}") from None
        suppress = [int(t) for t in suppress]
        if -1 in suppress:
            suppress = [t for t in suppress if t >= 0]
            suppress.extend(self.tokenizer.non_speech_tokens)
        tk = self.tokenizer
        suppress.extend([tk.transcribe, tk.translate, tk.sot, tk.sot_prev, tk.sot_lm, tk.no_speech])
        return tuple(sorted(set(suppress)))

    def _detect_language(self, features: AudioFeatures, tokens: np.ndarray):
        n_audio = features.batch_size
        languages = [self.options.language] * n_audio
        language_probs = None
        if self.options.language is None or self.options.task == "lang_id":
            language_tokens, language_probs = _detect_language_features(self.model, features, self.tokenizer)
            languages = [max(probs, key=probs.get) for probs in language_probs]
            if self.options.language is None:
                tokens[:, self.sot_index + 1] = language_tokens
        return languages, language_probs

    def _token_decoder(self, session: DecoderSession) -> TokenDecoder:
        if self.options.beam_size is not None:
            return BeamSearchDecoder(self.options.beam_size, self.tokenizer.eot, session.reorder,
                                     self.options.patience, self.normalizers,
                                     drops_rows=getattr(session, "drops_rows", False))
        return GreedyDecoder(self.options.temperature, self.tokenizer.eot, self.rng, self.normalizers)

    def _main_loop(self, session: DecoderSession, decoder: TokenDecoder, tokens: np.ndarray):
        n_batch = tokens.shape[0]
        sum_logprobs = np.zeros(n_batch, dtype=np.float32)
        no_speech_probs = [np.nan] * n_batch

        for i in range(self.sample_len):
            if i == 0:
                out = session.prefill(tokens, positions=self.prefill_logit_positions(tokens.shape[1]))
                no_speech_probs, logits = self.first_logits(out)
            else:
                logits = np.array(session.step(tokens[:, -1]), dtype=np.float32)
            tokens, stop = self.advance(decoder, tokens, logits, sum_logprobs)
            sum_logprobs = sum_logprobs[:tokens.shape[0]]  # rows of done audios may have left (beam search)
            if stop:
                break
        return tokens, sum_logprobs, no_speech_probs

    # The pieces of the loop, shared with runtime.continuous, which decodes windows as rows that
    # join and leave a running batch, one row at a time through these same steps.
    def prefill_logit_positions(self, n_tokens: int) -> List[int]:
        """Where the prefill's logits are read: at SOT (for no_speech_prob) and at the last token."""
        return [self.sot_index, n_tokens - 1]

    def first_logits(self, out: np.ndarray) -> Tuple[List[float], np.ndarray]:
        """The prefill's logits [batch, 2, vocab] -> no_speech_prob per row, the first step's logits."""
        out = np.asarray(out, dtype=np.float32)
        probs_at_sot = softmax(out[:, 0])
        no_speech_probs = [float(p) for p in probs_at_sot[:, self.tokenizer.no_speech].astype(np.float32)]
        return no_speech_probs, np.array(out[:, 1], dtype=np.float32)

    def advance(self, decoder: TokenDecoder, tokens: np.ndarray, logits: np.ndarray, sum_logprobs: np.ndarray
                ) -> Tuple[np.ndarray, bool]:
        """One sampled token per row after the logit filters; whether the decoding stops."""
        for logit_filter in self.logit_filters:
            logit_filter.apply(logits, tokens)
        tokens, completed = decoder.update(tokens, logits, sum_logprobs)
        return tokens, completed or tokens.shape[-1] > self.n_ctx

    def run(self, mel) -> List[DecodingResult]:
        features, _ = _as_features(self.model, mel)
        n_audio = features.batch_size
        tokens = np.tile(np.asarray(self.initial_tokens, dtype=np.int64), (n_audio, 1))

        languages, language_probs = self._detect_language(features, tokens)
        if self.options.task == "lang_id":
            return [DecodingResult(language=language, language_probs=probs)
                    for language, probs in zip(languages, language_probs)]

        tokens = np.repeat(tokens, self.n_group, axis=0)
        session = self.model.decoder(features, repeats=self.n_group)
        decoder = self._token_decoder(session)
        decoder.reset()
        tokens, sum_logprobs, no_speech_probs = self._main_loop(session, decoder, tokens)
        return self.results(decoder, tokens, sum_logprobs, no_speech_probs, languages, language_probs)

    def results(self, decoder: TokenDecoder, tokens: np.ndarray, sum_logprobs: np.ndarray,
                no_speech_probs: List[float], languages: List[str], language_probs) -> List[DecodingResult]:
        """The decoded rows [n_audio * n_group, length] -> one DecodingResult per audio (beam search: the
        rows of the audios still in the batch, see BeamSearchDecoder.finalize)."""
        n_audio = len(languages)
        no_speech_probs = no_speech_probs[:: self.n_group]
        tokens = tokens.reshape(tokens.shape[0] // self.n_group, self.n_group, -1)
        sum_logprobs = sum_logprobs.reshape(tokens.shape[0], self.n_group)

        # candidates per audio, cut between the first sampled token and the first EOT
        candidates, candidate_logprobs = decoder.finalize(tokens, sum_logprobs)
        eot = self.tokenizer.eot
        candidates = [[t[self.sample_begin: int(np.flatnonzero(t == eot)[0])] for t in group]
                      for group in candidates]

        selected = self.ranker.rank(candidates, candidate_logprobs)
        best_tokens = [[int(x) for x in group[i]] for i, group in zip(selected, candidates)]
        texts = [self.tokenizer.decode(t).strip() for t in best_tokens]
        best_logprobs = [lp[i] for i, lp in zip(selected, candidate_logprobs)]
        avg_logprobs = [lp / (len(t) + 1) for t, lp in zip(best_tokens, best_logprobs)]

        fields = (texts, languages, best_tokens, avg_logprobs, no_speech_probs)
        if len(set(map(len, fields))) != 1:
            raise RuntimeError(f"inconsistent result lengths: {list(map(len, fields))}")
        return [
            DecodingResult(
                language=language,
                language_probs=probs,
                tokens=toks,
                text=text,
                avg_logprob=avg,
                no_speech_prob=nsp,
                temperature=self.options.temperature,
                compression_ratio=compression_ratio(text),
                sum_logprob=lp,
            )
            for text, language, toks, avg, nsp, lp, probs in zip(
                texts, languages, best_tokens, avg_logprobs, no_speech_probs, best_logprobs,
                language_probs or [None] * n_audio)
        ]


def decode(model: Inference, mel, options: DecodingOptions = DecodingOptions(), *, tokenizer_path=None,
           rng: Optional[np.random.Generator] = None, **kwargs) -> Union[DecodingResult, List[DecodingResult]]:
    """Decode 30 s window(s): `whisper.decode` on the runtime.inference protocols.

    mel: float32 [n_mels, 3000] (returns one DecodingResult) or [batch, n_mels, 3000] (a list), or
    AudioFeatures from model.encode (a list). tokenizer_path: the model's .tiktoken vocabulary
    (default: `model.tokenizer_path` if the model has one). rng: the Generator for temperature > 0
    (default: a fresh unseeded one). kwargs replace fields of `options`.
    """
    if kwargs:
        unknown = sorted(set(kwargs) - set(DecodingOptions.__dataclass_fields__))
        if unknown:
            raise DecodingError(f"unknown decoding option(s): {', '.join(unknown)}")
        options = replace(options, **kwargs)
    single = isinstance(mel, np.ndarray) and mel.ndim == 2
    results = DecodingTask(model, options, tokenizer_path=tokenizer_path, rng=rng).run(mel)
    return results[0] if single else results
