"""Voice activity detection: where the speech is, and the way back from speech-only times to the audio's.

Silero VAD (an ONNX model run by onnxruntime; no torch) scores every 32 ms of 16 kHz audio with a
speech probability. `speech_timestamps` turns the scores into speech chunks (sample offsets), with
the rules and parameters of faster-whisper 1.2.1's `get_speech_timestamps` and the same results:
the model file is faster-whisper's own (pinned by sha256 below) and it is called the same way.
`collect_chunks` joins the chunks' audio into pieces of at most `max_duration` seconds, and
`SpeechTimestampsMap` maps a time in the joined speech back to the original audio, as faster-whisper's
functions of those names do; `restore_timestamps` applies the map to a transcription result.

Where the model comes from: faster-whisper==1.2.1 ships it as faster_whisper/assets/silero_vad_v6.onnx
(the `vad` extra installs that package; nothing here imports it). WHISPER_MAX_VAD_MODEL may name a
copy of the file instead. Either way its sha256 must be MODEL_SHA256.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import importlib.util
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from runtime.audio import SAMPLE_RATE
from runtime.decoding import DecodingError

MODEL_PACKAGE = "faster-whisper==1.2.1"
MODEL_ASSET = "faster_whisper/assets/silero_vad_v6.onnx"
MODEL_SHA256 = "4cbf549b8326f60f80f2536d9eefeb450a9abe83365a098031c89719f1be17d2"
MODEL_ENV = "WHISPER_MAX_VAD_MODEL"
INSTALL_HINT = "pip install 'whisper-max[vad]'"

WINDOW_SAMPLES = 512  # the model scores 32 ms windows of 16 kHz audio
CONTEXT_SAMPLES = 64  # ...each seen together with the last 64 samples of the window before
WINDOWS_PER_RUN = 10000  # windows per onnxruntime call (faster-whisper's batch: the same float results)
# a speech run cut for being too long is cut at its last silence of at least this long
MIN_SILENCE_SAMPLES_AT_MAX_SPEECH = SAMPLE_RATE * 98 / 1000


class VadError(DecodingError):
    """Bad VAD parameters or a missing or altered VAD model. A DecodingError, so every caller that reports
    bad transcription options in one line (CLI, server) reports these the same way."""


@dataclass(frozen=True)
class VadOptions:
    """faster-whisper's VadOptions: names, meanings and defaults.

    threshold: a window whose speech probability is at least this is speech.
    neg_threshold: below this a window is silence; between the two it continues what came before
        (default: max(threshold - 0.15, 0.01)).
    min_speech_duration_ms: speech chunks that end in silence and are not longer than this are dropped.
    max_speech_duration_s: longer speech is cut at its last silence of at least 98 ms, or, without one,
        just before this length.
    min_silence_duration_ms: a silence must last this long to end a speech chunk.
    speech_pad_ms: each chunk grows by this much on both sides (by half the gap where two chunks are
        closer than twice this).
    """

    threshold: float = 0.5
    neg_threshold: Optional[float] = None
    min_speech_duration_ms: float = 0
    max_speech_duration_s: float = float("inf")
    min_silence_duration_ms: float = 2000
    speech_pad_ms: float = 400

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_parameters(cls, parameters: Union[None, dict, "VadOptions"] = None, **defaults) -> "VadOptions":
        """Checked options from a dict of parameters (or VadOptions); `defaults` replace the class
        defaults for the parameters not given. Bad names or values raise VadError in one line."""
        if isinstance(parameters, VadOptions):
            parameters = {f.name: getattr(parameters, f.name) for f in fields(cls)}
        elif parameters is None:
            parameters = {}
        elif not isinstance(parameters, dict):
            raise VadError(f"vad_parameters must be a dict of VAD parameters, got {type(parameters).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(parameters) - set(names))
        if unknown:
            raise VadError(f"unknown VAD parameter {unknown[0]!r}; the parameters are {', '.join(names)}")
        options = cls(**{**defaults, **parameters})
        options.check()
        return options

    def check(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name == "neg_threshold":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    or math.isnan(value):
                raise VadError(f"VAD parameter {f.name} must be a number, got {value!r}")
            if value < 0 or (math.isinf(value) and f.name != "max_speech_duration_s"):
                raise VadError(f"VAD parameter {f.name} must be a finite number >= 0, got {value!r}")
        if self.threshold > 1:
            raise VadError(f"VAD threshold is a probability (0 to 1), got {self.threshold!r}")
        if self.neg_threshold is not None and self.neg_threshold > self.threshold:
            raise VadError(f"VAD neg_threshold ({self.neg_threshold!r}) must not exceed threshold "
                           f"({self.threshold!r})")
        if self.max_speech_samples <= 0:
            raise VadError(f"VAD max_speech_duration_s must be more than 2 * speech_pad_ms + 32 ms "
                           f"({(2 * self.speech_pad_ms + 32) / 1000:g} s), got {self.max_speech_duration_s!r}")

    @property
    def max_speech_samples(self) -> float:
        # room for a window's overshoot and the padding on both sides, so a padded chunk stays in bounds
        return SAMPLE_RATE * self.max_speech_duration_s - WINDOW_SAMPLES - 2 * self.speech_pad_samples

    @property
    def speech_pad_samples(self) -> float:
        return SAMPLE_RATE * self.speech_pad_ms / 1000


def model_path() -> Path:
    """The Silero VAD model file: $WHISPER_MAX_VAD_MODEL, or the copy inside the installed faster-whisper
    package (located without importing faster-whisper, which would load ctranslate2 and PyAV)."""
    named = os.environ.get(MODEL_ENV)
    if named:
        return Path(named)
    spec = importlib.util.find_spec("faster_whisper")
    if spec is None or not spec.submodule_search_locations:
        raise VadError(f"voice activity detection needs the Silero VAD model that {MODEL_PACKAGE} ships: "
                       f"{INSTALL_HINT} (or set {MODEL_ENV} to a copy of its {MODEL_ASSET})")
    return Path(list(spec.submodule_search_locations)[0]) / "assets" / Path(MODEL_ASSET).name


def load_vad_model(path: Union[None, str, os.PathLike] = None) -> "SileroVad":
    """The VAD model at `path` (default: model_path()), loaded and checked once per process and path."""
    return _load_vad_model(Path(path) if path is not None else model_path())


@functools.lru_cache(maxsize=4)
def _load_vad_model(path: Path) -> "SileroVad":
    return SileroVad(path)


class SileroVad:
    """Speech probabilities of 16 kHz audio, one per 512-sample window, from the pinned ONNX model."""

    def __init__(self, path: Union[str, os.PathLike]):
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise VadError(f"cannot read the VAD model {path}: {exc.strerror or exc}") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != MODEL_SHA256:
            raise VadError(f"VAD model {path} has sha256 {digest}, expected {MODEL_SHA256} "
                           f"({MODEL_ASSET} of {MODEL_PACKAGE})")
        try:
            import onnxruntime
        except ImportError:
            raise VadError(f"voice activity detection needs onnxruntime: {INSTALL_HINT}") from None
        # one thread and no arena, as faster-whisper runs it: the same arithmetic, the same probabilities
        options = onnxruntime.SessionOptions()
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = 1
        options.enable_cpu_mem_arena = False
        options.log_severity_level = 4
        self.session = onnxruntime.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        """float32 probabilities, one per window of the audio padded with zeros to whole windows (a length
        that is already whole gets one more window of zeros, as in faster-whisper)."""
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise VadError(f"VAD takes mono audio (one dimension), got shape {audio.shape}")
        return self.streamed([audio])[0]

    def streamed(self, blocks: Iterable[np.ndarray]) -> Tuple[np.ndarray, int]:
        """(the probabilities __call__ gives for the blocks joined, their number of samples), from
        audio given a block at a time (runtime.audio.stream_audio): only the samples of the run being
        scored are held, never the whole audio.

        The model runs its LSTM over the windows in order, WINDOWS_PER_RUN windows per call, with h
        and c carried from one call to the next. A run is scored once its samples have all come and
        more come after it (so it is not the last run, which is treated apart below): the same runs,
        with the same rows, as over the whole audio at once."""
        h = np.zeros((1, 1, 128), dtype=np.float32)
        c = np.zeros((1, 1, 128), dtype=np.float32)
        probabilities = []
        held = np.zeros(0, dtype=np.float32)  # samples from `held_from` on
        held_from = received = 0
        first = 0  # the next run's first window

        def run(first: int, last: int, final: bool):
            nonlocal h, c
            # Each row is a window with the 64 samples before it (zeros before the audio and after it).
            lo = first * WINDOW_SAMPLES - CONTEXT_SAMPLES  # the first sample the run reads
            stretch = np.zeros((last - first) * WINDOW_SAMPLES + CONTEXT_SAMPLES, dtype=np.float32)
            samples = held[max(lo, 0) - held_from: last * WINDOW_SAMPLES - held_from]
            stretch[max(lo, 0) - lo: max(lo, 0) - lo + len(samples)] = samples
            if final:
                # faster-whisper zeroes the last 64 samples of the final window (its context array is a
                # view of the windows); done here too, so the final window scores the same
                stretch[-CONTEXT_SAMPLES:] = 0
            rows = np.lib.stride_tricks.sliding_window_view(stretch, CONTEXT_SAMPLES + WINDOW_SAMPLES)
            scores, h, c = self.session.run(None, {"input": np.ascontiguousarray(rows[::WINDOW_SAMPLES]),
                                                   "h": h, "c": c})
            probabilities.append(scores)

        for block in blocks:
            block = np.asarray(block, dtype=np.float32).reshape(-1)
            held = np.concatenate([held, block]) if held.size else block
            received += len(block)
            # more samples than the run covers have come: it is not the last run
            while received > (first + WINDOWS_PER_RUN) * WINDOW_SAMPLES:
                run(first, first + WINDOWS_PER_RUN, final=False)
                first += WINDOWS_PER_RUN
                keep_from = first * WINDOW_SAMPLES - CONTEXT_SAMPLES  # the next run's context
                held, held_from = held[keep_from - held_from:], keep_from
        n_windows = received // WINDOW_SAMPLES + 1  # the audio padded with zeros to whole windows
        for start in range(first, n_windows, WINDOWS_PER_RUN):
            last = min(start + WINDOWS_PER_RUN, n_windows)
            run(start, last, final=last == n_windows)
        return np.concatenate(probabilities).reshape(-1), received


def speech_timestamps(audio: np.ndarray, options: Optional[VadOptions] = None,
                      model: Optional[SileroVad] = None) -> List[dict]:
    """[{"start", "end"}, ...]: the speech chunks of 16 kHz mono audio, in samples, as faster-whisper's
    get_speech_timestamps finds them."""
    options = VadOptions() if options is None else options
    options.check()
    probabilities = (model or load_vad_model())(audio)
    return speech_from_probabilities(probabilities, len(audio), options)


def streamed_speech_timestamps(blocks: Iterable[np.ndarray], options: Optional[VadOptions] = None,
                               model: Optional[SileroVad] = None) -> Tuple[List[dict], int]:
    """(speech_timestamps of the blocks joined, their number of samples), from audio given a block at
    a time: the whole audio is never held (an hour is 230 MB of samples)."""
    options = VadOptions() if options is None else options
    options.check()
    probabilities, n_samples = (model or load_vad_model()).streamed(blocks)
    return speech_from_probabilities(probabilities, n_samples, options), n_samples


def speech_blocks(blocks: Iterable[np.ndarray], chunks: List[dict]) -> Iterator[np.ndarray]:
    """The speech chunks' samples joined in order (collect_chunks' one piece), a block at a time, from
    the audio given a block at a time (runtime.audio.SpooledLogMel takes them so). The chunks are in
    order and do not overlap, as speech_timestamps makes them."""
    at = 0  # the sample the next block starts at
    i = 0  # the first chunk not yet passed
    for block in blocks:
        block = np.asarray(block, dtype=np.float32).reshape(-1)
        end = at + len(block)
        while i < len(chunks) and chunks[i]["start"] < end:
            piece = block[max(chunks[i]["start"] - at, 0): max(min(chunks[i]["end"], end) - at, 0)]
            if len(piece):
                yield piece
            if chunks[i]["end"] > end:
                break  # the chunk goes on in the next block
            i += 1
        at = end


def speech_from_probabilities(probabilities: Sequence, n_samples: int, options: VadOptions) -> List[dict]:
    """Speech chunks from per-window probabilities (float32: thresholds compare in float32, as there)."""
    threshold = options.threshold
    neg_threshold = max(threshold - 0.15, 0.01) if options.neg_threshold is None else options.neg_threshold
    min_speech = SAMPLE_RATE * options.min_speech_duration_ms / 1000
    min_silence = SAMPLE_RATE * options.min_silence_duration_ms / 1000
    max_speech = options.max_speech_samples

    runs: List[Tuple[int, int]] = []
    start = None  # where the current speech began; None outside speech
    # 0 stands for "none" in the three below, as in Silero's reference code
    silence_start = 0  # where the silence that may end the current speech began
    last_long_silence = 0  # start of the last silence >= 98 ms inside the current speech (a place to cut)
    resume = 0  # where speech came back after that silence

    for i, probability in enumerate(probabilities):
        at = WINDOW_SAMPLES * i
        is_speech = probability >= threshold
        if is_speech and silence_start:  # the silence was too short to end the speech
            silence_start = 0
            if resume < last_long_silence:
                resume = at
        if is_speech and start is None:
            start = at
            continue
        if start is not None and at - start > max_speech:
            if last_long_silence:  # cut at the last long silence; go on from where speech came back
                runs.append((start, last_long_silence))
                start = None if resume < last_long_silence else resume
                silence_start = last_long_silence = resume = 0
            else:  # no silence to cut at: cut here
                runs.append((start, at))
                start = None
                silence_start = last_long_silence = resume = 0
                continue
        if start is not None and probability < neg_threshold:
            if not silence_start:
                silence_start = at
            if at - silence_start > MIN_SILENCE_SAMPLES_AT_MAX_SPEECH:
                last_long_silence = silence_start
            if at - silence_start < min_silence:
                continue
            if silence_start - start > min_speech:
                runs.append((start, silence_start))
            start = None
            silence_start = last_long_silence = resume = 0
    if start is not None and n_samples - start > min_speech:
        runs.append((start, n_samples))
    return _pad(runs, n_samples, options.speech_pad_samples)


def _pad(runs: List[Tuple[int, int]], n_samples: int, pad: float) -> List[dict]:
    """Grow each chunk by `pad` samples each side, or by half the gap to a neighbour closer than 2 * pad."""
    chunks = [{"start": start, "end": end} for start, end in runs]
    if chunks:
        chunks[0]["start"] = int(max(0, chunks[0]["start"] - pad))
    for chunk, following in zip(chunks, chunks[1:]):
        gap = following["start"] - chunk["end"]
        grow = gap // 2 if gap < 2 * pad else pad
        chunk["end"] = int(min(n_samples, chunk["end"] + grow))
        following["start"] = int(max(0, following["start"] - grow))
    if chunks:
        chunks[-1]["end"] = int(min(n_samples, chunks[-1]["end"] + pad))
    return chunks


@dataclass
class AudioPiece:
    """Consecutive speech chunks joined: `samples`, starting `offset` seconds into the joined speech of the
    whole input and lasting `duration` seconds; `chunks` are the speech chunks in it (original samples)."""

    samples: np.ndarray
    offset: float
    duration: float
    chunks: List[dict]


def collect_chunks(audio: np.ndarray, chunks: List[dict], max_duration: float = float("inf")) -> List[AudioPiece]:
    """The speech chunks' audio, joined in order into pieces of at most `max_duration` seconds (a chunk
    is never split; one longer than max_duration is a piece of its own). No chunks: one empty piece."""
    pieces: List[AudioPiece] = []
    current: List[dict] = []
    length = joined = 0  # samples in the current piece; in the pieces before it
    limit = max_duration * SAMPLE_RATE

    def close() -> None:
        samples = np.concatenate([audio[c["start"]:c["end"]] for c in current]) if current \
            else np.zeros(0, dtype=np.float32)
        pieces.append(AudioPiece(np.asarray(samples, dtype=np.float32), joined / SAMPLE_RATE,
                                 length / SAMPLE_RATE, list(current)))

    for chunk in chunks:
        size = chunk["end"] - chunk["start"]
        if current and length + size > limit:
            close()
            joined += length
            current, length = [], 0
        current.append(chunk)
        length += size
    close()
    return pieces


class SpeechTimestampsMap:
    """Maps a time in the joined speech back to the original audio (faster-whisper's SpeechTimestampsMap)."""

    def __init__(self, chunks: List[dict], sampling_rate: int = SAMPLE_RATE, time_precision: int = 2):
        self.sampling_rate = sampling_rate
        self.time_precision = time_precision
        self.chunk_end_sample: List[int] = []  # each chunk's end, in joined-speech samples
        self.total_silence_before: List[float] = []  # seconds of audio dropped before each chunk
        previous_end = 0
        dropped = 0
        for chunk in chunks:
            dropped += chunk["start"] - previous_end
            previous_end = chunk["end"]
            self.chunk_end_sample.append(chunk["end"] - dropped)
            self.total_silence_before.append(dropped / sampling_rate)

    def get_chunk_index(self, time: float, is_end: bool = False) -> int:
        """The chunk a joined-speech time falls in; an end time exactly at a chunk's end stays in that chunk."""
        sample = int(time * self.sampling_rate)
        if is_end and sample in self.chunk_end_sample:
            return self.chunk_end_sample.index(sample)
        return min(bisect.bisect(self.chunk_end_sample, sample), len(self.chunk_end_sample) - 1)

    def get_original_time(self, time: float, chunk_index: Optional[int] = None, is_end: bool = False) -> float:
        if chunk_index is None:
            chunk_index = self.get_chunk_index(time, is_end)
        return round(self.total_silence_before[chunk_index] + time, self.time_precision)


def restore_timestamps(result: dict, chunks: List[dict]) -> dict:
    """Move a transcription of the joined speech of `chunks` onto the original audio's timeline, in place."""
    if chunks:
        result["segments"] = restore_segments(result["segments"], SpeechTimestampsMap(chunks))
    return result


def restore_segments(segments: List[dict], timeline: SpeechTimestampsMap) -> List[dict]:
    """The segments with times on the original audio's timeline (new dicts; the given ones are left alone):
    each word by the chunk its middle falls in (both ends by the same chunk), a segment with words from
    its first and last word, one without by its own start and end (faster-whisper's
    restore_speech_timestamps)."""
    restored = []
    for segment in segments:
        segment = dict(segment)
        if segment.get("words"):
            words = []
            for word in segment["words"]:
                index = timeline.get_chunk_index((word["start"] + word["end"]) / 2)
                words.append({**word, "start": timeline.get_original_time(word["start"], index),
                              "end": timeline.get_original_time(word["end"], index)})
            segment["words"] = words
            segment["start"], segment["end"] = words[0]["start"], words[-1]["end"]
        else:
            segment["start"] = timeline.get_original_time(segment["start"])
            segment["end"] = timeline.get_original_time(segment["end"], is_end=True)
        restored.append(segment)
    return restored


def speech_only(audio: np.ndarray, parameters: Union[None, dict, VadOptions] = None) -> Tuple[np.ndarray, List[dict]]:
    """(the speech of `audio` joined, its chunks): what WhisperModel.transcribe(vad_filter=True) transcribes."""
    chunks = speech_timestamps(audio, VadOptions.from_parameters(parameters))
    (piece,) = collect_chunks(audio, chunks)
    return piece.samples, chunks
