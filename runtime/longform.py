"""Long-form transcription, reproducing `whisper.transcribe` on the runtime.inference protocols.

The audio is cut into 30 s windows by a seek pointer: each window is decoded (falling back to
higher temperatures when the output is too repetitive or improbable), split into segments at its
timestamp tokens, and the pointer moves to the end of the last complete segment. The previous
windows' text conditions the next one. The result dict has openai-whisper's keys and values.

`start_transcription` does everything before the first window (reading the audio, the log-mel,
language detection) and returns a Transcription that yields each segment as its window is decoded,
so a server can stream them; `transcribe` is the dict-returning wrapper, whisper.transcribe's shape.

With word_timestamps=True each window's segments get "words" (runtime/timing.py), the seek
pointer moves to the end of the last word, and hallucination_silence_threshold skips silence
around segments whose words look hallucinated, as openai-whisper does.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, fields
from typing import BinaryIO, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from runtime.audio import (
    FRAMES_PER_SECOND,
    HOP_LENGTH,
    LogMelPrefetch,
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    SpooledLogMel,
    load_audio,
    load_mel_filters,
    log_mel_spectrogram,
    pad_or_trim,
    stream_audio,
)
from runtime.decoding import (
    DecodingError,
    DecodingOptions,
    DecodingResult,
    decode,
    detect_language,
    verify_options,
)
from runtime.inference import Inference
from runtime.options import TranscribeOptions, options_at_temperature
from runtime.timing import add_word_timestamps, get_end
from runtime.tokenizer import LANGUAGES, TokenizerError, get_tokenizer
from runtime.vad import (SpeechTimestampsMap, VadOptions, restore_segments, speech_blocks, speech_only,
                         streamed_speech_timestamps)
from runtime.writers import format_timestamp

_OPTION_NAMES = {f.name for f in fields(DecodingOptions)} - {"temperature"}


def _make_safe(text: str) -> str:
    """Replace what stdout's encoding cannot represent (openai-whisper's make_safe)."""
    encoding = sys.getdefaultencoding()
    if encoding == "utf-8":
        return text
    return text.encode(encoding, errors="replace").decode(encoding)


def _parse_clip_timestamps(clip_timestamps: Union[str, Sequence[float]], content_frames: int
                           ) -> List[Tuple[int, int]]:
    if isinstance(clip_timestamps, str):
        try:
            clip_timestamps = [float(ts) for ts in (clip_timestamps.split(",") if clip_timestamps else [])]
        except ValueError:
            raise DecodingError(f"clip_timestamps must be comma-separated seconds, got {clip_timestamps!r}") from None
    seek_points = [round(float(ts) * FRAMES_PER_SECOND) for ts in clip_timestamps]
    if len(seek_points) == 0:
        seek_points.append(0)
    if len(seek_points) % 2 == 1:
        seek_points.append(content_frames)
    return list(zip(seek_points[::2], seek_points[1::2]))


def needs_fallback(result: DecodingResult, compression_ratio_threshold: Optional[float],
                   logprob_threshold: Optional[float], no_speech_threshold: Optional[float]) -> bool:
    """whisper.transcribe's rule for decoding a window again, hotter: too repetitive or too
    improbable, unless the window is silence."""
    failed = ((compression_ratio_threshold is not None and result.compression_ratio > compression_ratio_threshold)
              or (logprob_threshold is not None and result.avg_logprob < logprob_threshold))
    silence = (no_speech_threshold is not None and result.no_speech_prob > no_speech_threshold
               and logprob_threshold is not None and result.avg_logprob < logprob_threshold)
    return failed and not silence


def is_silent(result: DecodingResult, no_speech_threshold: Optional[float], logprob_threshold: Optional[float]) -> bool:
    """Voice activity as whisper.transcribe judges it: a window the model calls silent is skipped,
    unless its text is probable."""
    if no_speech_threshold is None or result.no_speech_prob <= no_speech_threshold:
        return False
    return not (logprob_threshold is not None and result.avg_logprob > logprob_threshold)


def split_window(tokens: np.ndarray, timestamp_begin: int, time_offset: float, duration: float,
                 time_precision: float) -> Tuple[List[Tuple[float, float, np.ndarray]], Optional[int]]:
    """A window's tokens cut into segments as whisper.transcribe cuts them: where two timestamp
    tokens meet (end of one, start of the next), else one segment ending at the last timestamp.

    Returns ([(start, end, tokens)], resume): resume is the timestamp position the next window
    starts from when the last segment is unfinished, None when the whole window is done.
    """
    is_timestamp = tokens >= timestamp_begin
    single_timestamp_ending = is_timestamp[-2:].tolist() == [False, True]
    consecutive = np.flatnonzero(is_timestamp[:-1] & is_timestamp[1:]) + 1
    if len(consecutive) == 0:
        timestamps = tokens[is_timestamp]
        if len(timestamps) > 0 and int(timestamps[-1]) != timestamp_begin:
            # no pair of timestamps, but a last one: the segment ends there
            duration = (int(timestamps[-1]) - timestamp_begin) * time_precision
        return [(time_offset, time_offset + duration, tokens)], None
    slices = consecutive.tolist()
    if single_timestamp_ending:
        slices.append(len(tokens))
    pieces = []
    last_slice = 0
    for current_slice in slices:
        sliced = tokens[last_slice:current_slice]
        pieces.append((time_offset + (int(sliced[0]) - timestamp_begin) * time_precision,
                       time_offset + (int(sliced[-1]) - timestamp_begin) * time_precision, sliced))
        last_slice = current_slice
    if single_timestamp_ending:
        return pieces, None  # a lone timestamp before EOT: nothing is spoken after it in this window
    # the text after the last pair is an unfinished segment: drop it, resume at the last timestamp
    return pieces, int(tokens[last_slice - 1]) - timestamp_begin


def _can_read_twice(source) -> bool:
    """Whether stream_audio can decode `source` a second time: a path or bytes, or a file object that
    can seek back to where it is now."""
    if not hasattr(source, "read"):
        return True
    try:
        return bool(source.seekable()) and source.tell() >= 0
    except (AttributeError, OSError, ValueError):
        return False


def check_decode_options(temperatures: Sequence[float], decode_options: dict) -> None:
    """DecodingError, before any work, for options a decode at one of `temperatures` would reject
    (e.g. beam_size=0, or patience without beam_size at temperature 0)."""
    unknown = sorted(set(decode_options) - _OPTION_NAMES)
    if unknown:
        raise DecodingError(f"unknown decoding option(s): {', '.join(unknown)}")
    for t in temperatures:
        verify_options(options_at_temperature(decode_options, t))


def _progress_bar(total: int, disable: bool):
    try:
        import tqdm
    except ImportError:  # tqdm is a dependency, but the transcription does not need it
        return _NoProgress()
    return tqdm.tqdm(total=total, unit="frames", disable=disable)


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        pass


@dataclass
class TranscriptionInfo:
    """What is known before the first window is decoded."""

    language: str
    language_probs: Optional[Dict[str, float]]  # every language's probability, when it was detected
    duration: float  # seconds of audio (with vad_filter, all of it, not only the speech decoded)
    options: TranscribeOptions


class Transcription:
    """A transcription under way. `info` is known at once; iterating yields each segment (openai-whisper's
    dict, with its "id") as soon as its window is decoded; `result()` finishes it and returns
    whisper.transcribe's dict. `close()` stops it between windows."""

    def __init__(self, generator: Iterator[dict], info: TranscriptionInfo, tokenizer):
        self.info = info
        self.segments: List[dict] = []
        self._generator = generator
        self._tokenizer = tokenizer

    def __iter__(self) -> Iterator[dict]:
        for segment in self._generator:
            self.segments.append(segment)
            yield segment

    def close(self) -> None:
        self._generator.close()

    def result(self) -> dict:
        for _ in self:
            pass
        # the text is decoded from all tokens at once, as openai-whisper does (a character can span
        # two segments' tokens); emptied segments hold no tokens
        tokens = [token for segment in self.segments for token in segment["tokens"]]
        return dict(text=self._tokenizer.decode(tokens), segments=self.segments, language=self.info.language)


AudioSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, np.ndarray, LogMelPrefetch]


def transcribe(model: Inference, audio: AudioSource, *, mel_filters, tokenizer_path,
               rng: Optional[np.random.Generator] = None, decode_fn: Optional[Callable] = None,
               **options) -> dict:
    """Transcribe an audio file or float32 16 kHz mono samples, as `whisper.transcribe` does.

    mel_filters: the [n_mels, 201] filterbank, or the path of an npz like whisper's
    mel_filters.npz. tokenizer_path: the model's .tiktoken vocabulary. rng: the Generator used
    when a window falls back to temperature > 0 (default: unseeded). options: whisper.transcribe's
    keywords (runtime.options.TranscribeOptions), with its defaults, checked before any work;
    batch_windows: how many windows to decode as one batch where the windows cannot depend on
    each other (see `prefetch_batch` below; 1 decodes one window at a time).

    Returns {"text", "segments": [{"id", "seek", "start", "end", "text", "tokens", "temperature",
    "avg_logprob", "compression_ratio", "no_speech_prob"}, ...], "language"}.
    """
    return start_transcription(model, audio, TranscribeOptions.from_kwargs(**options), mel_filters=mel_filters,
                               tokenizer_path=tokenizer_path, rng=rng, decode_fn=decode_fn).result()


def start_transcription(model: Inference, audio: AudioSource, options: TranscribeOptions, *, mel_filters,
                        tokenizer_path, rng: Optional[np.random.Generator] = None,
                        decode_fn: Optional[Callable] = None) -> Transcription:
    """Read the audio, detect the language if needed, and return the Transcription whose iteration
    decodes the windows one after the other (faster-whisper's generate_segments works the same way).

    decode_fn: what decodes a window (or a batch of windows), called as runtime.decoding.decode;
    the server passes one that batches the windows of concurrent requests.
    """
    generator = _transcription(model, audio, options, mel_filters=mel_filters, tokenizer_path=tokenizer_path,
                               rng=rng, decode_fn=decode_fn)
    info, tokenizer = next(generator)  # everything before the first window, errors included, happens here
    return Transcription(generator, info, tokenizer)


def _transcription(model: Inference, audio: AudioSource, options: TranscribeOptions, *, mel_filters,
                   tokenizer_path, rng, decode_fn):
    """Yields (info, tokenizer) first, then every segment; whisper.transcribe's loop."""
    options.validate()
    run_decode = decode_fn or decode  # looked up per call, so tests can wrap the module's decode
    verbose = options.verbose
    temperatures = list(options.temperature)
    compression_ratio_threshold = options.compression_ratio_threshold
    logprob_threshold = options.logprob_threshold
    no_speech_threshold = options.no_speech_threshold
    condition_on_previous_text = options.condition_on_previous_text
    initial_prompt = options.initial_prompt
    carry_initial_prompt = options.carry_initial_prompt
    word_timestamps = options.word_timestamps
    prepend_punctuations = options.prepend_punctuations
    append_punctuations = options.append_punctuations
    clip_timestamps = options.clip_timestamps
    # hallucination_silence_threshold only acts with word timestamps (as in openai-whisper)
    hallucination_silence_threshold = options.hallucination_silence_threshold
    batch_windows = options.batch_windows
    decode_options = options.decode_options()
    decode_options.pop("fp16", None)
    language_probs = None
    if isinstance(mel_filters, (str, os.PathLike)):
        mel_filters = load_mel_filters(mel_filters, model.dims.n_mels)
    # Audio decoded here (a path, bytes, a file object) is never held whole: stream_audio's blocks of
    # samples become the log-mel as ffmpeg decodes them, and the log-mel goes to a temporary file
    # (SpooledLogMel; each window read back is the one-piece log_mel_spectrogram's, bit for bit).
    # Samples given in memory keep the one-piece log_mel_spectrogram: the caller holds twice that anyway.
    decoded_here = not isinstance(audio, np.ndarray) and (
        isinstance(audio, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(audio, "read"))
    # vad_filter (faster-whisper's): decode the speech alone, joined; segments are mapped back to the
    # audio's timeline as they are printed and yielded (all the loop's own times stay the speech's)
    speech_timeline = None
    audio_duration = None  # with VAD: the whole audio's, which the speech alone is shorter than
    # the log-mel has 30 s of silence after the audio (padding), so every window can be sliced whole
    if isinstance(audio, LogMelPrefetch):  # the log-mel a caller started early (the CLI's first file)
        if options.vad_filter or audio.padding != N_SAMPLES or not np.array_equal(audio.filters, mel_filters):
            raise ValueError("a LogMelPrefetch must be made with the model's Mel filters and padding=N_SAMPLES, "
                             "without vad_filter")
        mel = audio.result()
    elif options.vad_filter:
        if decoded_here and _can_read_twice(audio):
            # two passes over ffmpeg's output, neither holding the audio whole: the VAD scores it, then
            # the speech it found is cut out of it again and becomes the log-mel as it comes
            start = audio.tell() if hasattr(audio, "read") else None
            speech_chunks, n_samples = streamed_speech_timestamps(
                stream_audio(audio), VadOptions.from_parameters(options.vad_parameters))
            if start is not None:
                audio.seek(start)
            audio_duration = n_samples / SAMPLE_RATE
            mel = SpooledLogMel(speech_blocks(stream_audio(audio), speech_chunks), mel_filters, padding=N_SAMPLES)
        else:
            if decoded_here:  # a stream that cannot be read again: its samples are held while the VAD runs
                audio = load_audio(audio)
            audio_duration = len(audio) / SAMPLE_RATE
            audio, speech_chunks = speech_only(np.asarray(audio, dtype=np.float32), options.vad_parameters)
            mel = SpooledLogMel([audio], mel_filters, padding=N_SAMPLES)
        speech_timeline = SpeechTimestampsMap(speech_chunks) if speech_chunks else None
    elif decoded_here:
        mel = SpooledLogMel(stream_audio(audio), mel_filters, padding=N_SAMPLES)
    else:
        mel = log_mel_spectrogram(np.asarray(audio, dtype=np.float32), mel_filters, padding=N_SAMPLES)
    del audio  # the samples are not needed any more: a long transcription holds only its log-mel
    content_frames = mel.shape[-1] - N_FRAMES
    content_duration = float(content_frames * HOP_LENGTH / SAMPLE_RATE)

    # The window the language was detected on, with its audio features: the first window decodes from
    # them when it is the same log-mel (it is when that window starts at 0 and the audio lasts 30 s or
    # more), as faster-whisper reuses its detection's encoder output, instead of encoding it again.
    detected_window = None
    if decode_options.get("language", None) is None:
        if not model.is_multilingual:
            decode_options["language"] = "en"
        else:
            if verbose:
                print("Detecting language using up to the first 30 seconds. Use `--language` to specify the language")
            mel_segment = pad_or_trim(mel[:, :N_FRAMES], N_FRAMES)
            features = model.encode(mel_segment[None])
            _, (probs,) = detect_language(model, features, tokenizer_path=tokenizer_path)
            detected_window = (mel_segment, features)
            decode_options["language"] = max(probs, key=probs.get)
            language_probs = probs
            if verbose is not None:
                print(f"Detected language: {LANGUAGES[decode_options['language']].title()}")

    language: str = decode_options["language"]
    task: str = decode_options.get("task", "transcribe")
    try:
        tokenizer = get_tokenizer(tokenizer_path, model.is_multilingual, num_languages=model.num_languages,
                                  language=language, task=task)
    except TokenizerError as e:
        raise DecodingError(str(e)) from e

    seek_clips = _parse_clip_timestamps(clip_timestamps, content_frames)
    yield TranscriptionInfo(language=language, language_probs=language_probs,
                            duration=content_duration if audio_duration is None else audio_duration,
                            options=options), tokenizer
    # symbols that do not count as words when scoring a segment for hallucination
    punctuation = "\"'“¿([{-\"'.。,，!！?？:：”)]}、"

    if word_timestamps and task == "translate":
        warnings.warn("Word-level timestamps on translations may not be reliable.")

    # Without timestamps, conditioning or a prompt, every window decodes from its own audio with
    # the same options, and the loop moves on by whole windows unless the model emits two
    # timestamp tokens in a row. So the first-temperature pass of the windows on that grid can be
    # decoded as one batch ahead of the loop: each decoder step then reads the weights once for
    # them all. A prefetched result is used only when the loop reaches exactly its window with an
    # empty prompt, so the outcome is the one-window-at-a-time outcome; fallbacks still run alone.
    # Not with beam search: decoding in a batch runs until every window's beams have finished, and
    # with patience < 1 a window that stops early fills its candidates from its live beams, which
    # would have grown further in the batch; MAX also rounds a batch a little differently, which
    # can flip near-tied beams. So beam search decodes one window at a time, as openai-whisper.
    batchable = (batch_windows > 1 and decode_options.get("without_timestamps", False)
                 and not condition_on_previous_text and initial_prompt is None
                 and decode_options.get("beam_size") is None and temperatures[0] == 0
                 and not decode_options.get("prefix")
                 # word timestamps move the seek to the last word, off the 30 s grid
                 and not word_timestamps)
    prefetched: dict = {}

    def options_at(t: float) -> DecodingOptions:
        return options_at_temperature(decode_options, t)

    def prefetch_batch(start: int, clip_end: int) -> None:
        seeks = [s for s in range(start, min(content_frames, clip_end), N_FRAMES)][:batch_windows]
        segments = np.stack([pad_or_trim(mel[:, s: s + min(N_FRAMES, content_frames - s, clip_end - s)], N_FRAMES)
                             for s in seeks])
        results = run_decode(model, segments, options_at(temperatures[0]), tokenizer_path=tokenizer_path, rng=rng)
        prefetched.clear()
        prefetched.update(zip(seeks, results))

    def decode_with_fallback(segment, window_seek: Optional[int] = None,
                             clip_end: Optional[int] = None) -> DecodingResult:
        result = None
        for t in temperatures:
            if (t == temperatures[0] and batchable and window_seek is not None
                    and not decode_options.get("prompt")):
                if window_seek not in prefetched:
                    prefetch_batch(window_seek, clip_end)
                result = prefetched.pop(window_seek)
            else:
                if isinstance(segment, np.ndarray):  # encoded once, for every temperature it falls back to
                    segment = model.encode(segment[None])
                result = run_decode(model, segment, options_at(t), tokenizer_path=tokenizer_path, rng=rng)
                if isinstance(result, list):  # decoded from the window's audio features
                    (result,) = result

            if not needs_fallback(result, compression_ratio_threshold, logprob_threshold, no_speech_threshold):
                break
        return result

    clip_idx = 0
    seek = seek_clips[clip_idx][0]
    input_stride = N_FRAMES // model.dims.n_audio_ctx  # mel frames per output token: 2
    if input_stride * model.dims.n_audio_ctx != N_FRAMES:
        raise DecodingError(f"n_audio_ctx {model.dims.n_audio_ctx} does not divide {N_FRAMES} frames")
    time_precision = input_stride * HOP_LENGTH / SAMPLE_RATE  # seconds per timestamp step: 0.02
    all_tokens: List[int] = []
    all_segments: List[dict] = []
    prompt_reset_since = 0

    remaining_prompt_length = model.dims.n_text_ctx // 2 - 1
    if initial_prompt is not None:
        initial_prompt_tokens = tokenizer.encode(" " + initial_prompt.strip())
        all_tokens.extend(initial_prompt_tokens)
        remaining_prompt_length -= len(initial_prompt_tokens)
    else:
        initial_prompt_tokens = []

    def new_segment(*, start: float, end: float, tokens: np.ndarray, result: DecodingResult) -> dict:
        token_list = [int(t) for t in tokens]
        text_tokens = [t for t in token_list if t < tokenizer.eot]
        return {
            "seek": seek,
            "start": start,
            "end": end,
            "text": tokenizer.decode(text_tokens),
            "tokens": token_list,
            "temperature": result.temperature,
            "avg_logprob": result.avg_logprob,
            "compression_ratio": result.compression_ratio,
            "no_speech_prob": result.no_speech_prob,
        }

    # hallucination heuristics (openai-whisper's): a segment is anomalous when its first words are
    # improbable, very short or very long
    def word_anomaly_score(word: dict) -> float:
        probability = word.get("probability", 0.0)
        duration = word["end"] - word["start"]
        score = 0.0
        if probability < 0.15:
            score += 1.0
        if duration < 0.133:
            score += (0.133 - duration) * 15
        if duration > 2.0:
            score += duration - 2.0
        return score

    def is_segment_anomaly(segment: Optional[dict]) -> bool:
        if segment is None or not segment["words"]:
            return False
        words = [w for w in segment["words"] if w["word"] not in punctuation][:8]
        score = sum(word_anomaly_score(w) for w in words)
        return score >= 3 or score + 0.01 >= len(words)

    def next_words_segment(segments: List[dict]) -> Optional[dict]:
        return next((s for s in segments if s["words"]), None)

    last_speech_timestamp = 0.0
    # the progress bar shows when verbose is False (with True, the segments are printed)
    with _progress_bar(content_frames, disable=verbose is not False) as pbar:
        while clip_idx < len(seek_clips):
            seek_clip_start, seek_clip_end = seek_clips[clip_idx]
            if seek < seek_clip_start:
                seek = seek_clip_start
            if seek >= seek_clip_end:
                clip_idx += 1
                if clip_idx < len(seek_clips):
                    seek = seek_clips[clip_idx][0]
                continue
            time_offset = float(seek * HOP_LENGTH / SAMPLE_RATE)
            window_end_time = float((seek + N_FRAMES) * HOP_LENGTH / SAMPLE_RATE)
            segment_size = min(N_FRAMES, content_frames - seek, seek_clip_end - seek)
            mel_segment = pad_or_trim(mel[:, seek: seek + segment_size], N_FRAMES)
            segment_duration = segment_size * HOP_LENGTH / SAMPLE_RATE

            if carry_initial_prompt:
                n_ignored = max(len(initial_prompt_tokens), prompt_reset_since)
                remaining_prompt = all_tokens[n_ignored:][-remaining_prompt_length:]
                decode_options["prompt"] = initial_prompt_tokens + remaining_prompt
            else:
                decode_options["prompt"] = all_tokens[prompt_reset_since:]

            features = None
            if detected_window is not None:
                if np.array_equal(detected_window[0], mel_segment):
                    features = detected_window[1]
                detected_window = None
            # word timestamps align against the window's audio features: encode it once for both
            if features is None and word_timestamps:
                features = model.encode(mel_segment[None])
            result = decode_with_fallback(mel_segment if features is None else features, seek, seek_clip_end)
            tokens = np.asarray(result.tokens, dtype=np.int64)

            if is_silent(result, no_speech_threshold, logprob_threshold):
                seek += segment_size  # on to the next window
                continue

            previous_seek = seek
            current_segments: List[dict] = []

            is_timestamp = tokens >= tokenizer.timestamp_begin
            single_timestamp_ending = is_timestamp[-2:].tolist() == [False, True]
            pieces, resume = split_window(tokens, tokenizer.timestamp_begin, time_offset, segment_duration,
                                          time_precision)
            for start, end, sliced in pieces:
                current_segments.append(new_segment(start=start, end=end, tokens=sliced, result=result))
            seek += segment_size if resume is None else resume * input_stride

            if word_timestamps:
                add_word_timestamps(
                    segments=current_segments,
                    model=model,
                    tokenizer=tokenizer,
                    audio_features=features,
                    num_frames=segment_size,
                    prepend_punctuations=prepend_punctuations,
                    append_punctuations=append_punctuations,
                    last_speech_timestamp=last_speech_timestamp,
                )

                if not single_timestamp_ending:
                    # continue right after the last word, not at the last timestamp token
                    last_word_end = get_end(current_segments)
                    if last_word_end is not None and last_word_end > time_offset:
                        seek = round(last_word_end * FRAMES_PER_SECOND)

                # skip silence before possible hallucinations
                if hallucination_silence_threshold is not None:
                    threshold = hallucination_silence_threshold
                    if not single_timestamp_ending:
                        last_word_end = get_end(current_segments)
                        if last_word_end is not None and last_word_end > time_offset:
                            remaining_duration = window_end_time - last_word_end
                            if remaining_duration > threshold:
                                seek = round(last_word_end * FRAMES_PER_SECOND)
                            else:
                                seek = previous_seek + segment_size

                    # a first segment that may be a hallucination: skip the silence before it
                    first_segment = next_words_segment(current_segments)
                    if first_segment is not None and is_segment_anomaly(first_segment):
                        gap = first_segment["start"] - time_offset
                        if gap > threshold:
                            seek = previous_seek + round(gap * FRAMES_PER_SECOND)
                            continue

                    # a possible hallucination surrounded by silence or more hallucinations: drop it
                    # and what follows, and continue from its start
                    hal_last_end = last_speech_timestamp
                    for si in range(len(current_segments)):
                        segment = current_segments[si]
                        if not segment["words"]:
                            continue
                        if is_segment_anomaly(segment):
                            next_segment = next_words_segment(current_segments[si + 1:])
                            if next_segment is not None:
                                hal_next_start = next_segment["words"][0]["start"]
                            else:
                                hal_next_start = time_offset + segment_duration
                            silence_before = (segment["start"] - hal_last_end > threshold
                                              or segment["start"] < threshold
                                              or segment["start"] - time_offset < 2.0)
                            silence_after = (hal_next_start - segment["end"] > threshold
                                             or is_segment_anomaly(next_segment)
                                             or window_end_time - segment["end"] < 2.0)
                            if silence_before and silence_after:
                                seek = round(max(time_offset + 1, segment["start"]) * FRAMES_PER_SECOND)
                                if content_duration - segment["end"] < threshold:
                                    seek = content_frames
                                current_segments[si:] = []
                                break
                        hal_last_end = segment["end"]

                last_word_end = get_end(current_segments)
                if last_word_end is not None:
                    last_speech_timestamp = last_word_end

            if verbose:
                for segment in (current_segments if speech_timeline is None
                                else restore_segments(current_segments, speech_timeline)):
                    start, end, text = segment["start"], segment["end"], segment["text"]
                    print(_make_safe(f"[{format_timestamp(start)} --> {format_timestamp(end)}] {text}"))

            # an instantaneous segment, or one without text, is emptied
            for segment in current_segments:
                if segment["start"] == segment["end"] or segment["text"].strip() == "":
                    segment["text"] = ""
                    segment["tokens"] = []
                    segment["words"] = []

            new_segments = [{"id": i, **segment} for i, segment in enumerate(current_segments, start=len(all_segments))]
            if speech_timeline is not None:
                new_segments = restore_segments(new_segments, speech_timeline)
            all_segments.extend(new_segments)
            all_tokens.extend(token for segment in current_segments for token in segment["tokens"])

            if not condition_on_previous_text or result.temperature > 0.5:
                # text sampled at a high temperature does not condition the next window
                prompt_reset_since = len(all_tokens)

            pbar.update(min(content_frames, seek) - previous_seek)
            yield from new_segments

