"""Batched transcription of many inputs: 30 s chunks of every file decoded together.

`whisper.transcribe` decodes one window at a time because each window depends on the one before:
the next window starts where the last complete segment ended, and the previous text conditions
it. A batch cannot wait for that. This mode cuts every input into fixed 30 s chunks (the last one
shorter) and decodes the chunks of all inputs `batch_size` at a time, so one decoder step reads
the weights once for the whole batch; with greedy decoding the batch is a running one
(runtime.continuous): a chunk that reaches its end hands its row to the next chunk at once. That is how faster-whisper's BatchedInferencePipeline
works too. The result differs from `transcribe` in two ways:
- chunks do not move with the timestamps: a segment cut by a chunk boundary stays cut;
- no conditioning on previous text (every chunk gets the same `initial_prompt`, if any).
Without timestamps and with condition_on_previous_text=False, `transcribe` moves by whole windows
as well, so both give the same tokens (tested). Temperature fallback works per chunk: the chunks
that fail at one temperature are decoded again, together, at the next.

With vad_filter=True the chunks are not the 30 s grid but the speech that Silero VAD finds
(runtime/vad.py), as in faster-whisper's BatchedInferencePipeline: speech chunks of at most 30 s
(max_speech_duration_s, default and upper bound 30; min_silence_duration_ms defaults to 160 here)
are joined in order into pieces of at most 30 s, each piece is one chunk of the batch with its own
log-mel, and the segments' times are mapped from the joined speech back to the file's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from runtime.audio import FRAMES_PER_SECOND, HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, load_audio, load_mel_filters, \
    log_mel_spectrogram, pad_or_trim
from runtime.continuous import decode_windows, joins
from runtime.decoding import DecodingError, DecodingResult, decode, detect_language
from runtime.inference import Inference
from runtime.longform import check_decode_options, is_silent, needs_fallback, split_window
from runtime.options import options_at_temperature
from runtime.tokenizer import TokenizerError, get_tokenizer
from runtime.vad import VadError, VadOptions, collect_chunks, restore_timestamps, speech_timestamps

# the VAD's defaults in batched mode (faster-whisper's BatchedInferencePipeline): a speech chunk must fit
# one window, and a short silence is enough to cut there
BATCHED_VAD_DEFAULTS = dict(max_speech_duration_s=30.0, min_silence_duration_ms=160)


@dataclass
class _Chunk:
    source: int  # index of the input
    seek: int  # first mel frame (of the joined speech, with VAD)
    offset: float  # seconds from the start of the input (of its joined speech, with VAD)
    duration: float  # seconds of audio in it
    mel: np.ndarray
    language: str
    result: Optional[DecodingResult] = None


def _segments(chunk: _Chunk, tokenizer, time_precision: float) -> List[dict]:
    """A chunk's segments: split at consecutive timestamp tokens, as whisper.transcribe splits a window."""
    result = chunk.result
    pieces, _ = split_window(np.asarray(result.tokens, dtype=np.int64), tokenizer.timestamp_begin,
                             chunk.offset, chunk.duration, time_precision)
    segments = []
    for start, end, piece in pieces:
        token_list = [int(t) for t in piece]
        text = tokenizer.decode([t for t in token_list if t < tokenizer.eot])
        if start == end or not text.strip():  # instantaneous or empty: whisper clears such segments
            text, token_list = "", []
        segments.append({"seek": chunk.seek, "start": start, "end": end, "text": text, "tokens": token_list,
                         "temperature": result.temperature, "avg_logprob": result.avg_logprob,
                         "compression_ratio": result.compression_ratio, "no_speech_prob": result.no_speech_prob})
    return segments


def _input_chunks(index: int, audio: np.ndarray, mel: np.ndarray, speech: Optional[List[dict]], mel_filters,
                  language: Optional[str]) -> List[_Chunk]:
    """One input's chunks: its 30 s grid over `mel` (the padded log-mel of its audio), or with VAD (speech:
    its speech chunks) one chunk per piece of joined speech (at most 30 s), with the piece's own log-mel."""
    chunks = []
    if speech is None:
        content_frames = mel.shape[-1] - N_FRAMES
        for seek in range(0, content_frames, N_FRAMES):
            frames = min(N_FRAMES, content_frames - seek)
            chunks.append(_Chunk(index, seek, float(seek * HOP_LENGTH / SAMPLE_RATE),
                                 float(frames * HOP_LENGTH / SAMPLE_RATE),
                                 pad_or_trim(mel[:, seek:seek + frames], N_FRAMES), language))
        return chunks
    for piece in collect_chunks(audio, speech, max_duration=N_SAMPLES / SAMPLE_RATE):
        if len(piece.samples) == 0:  # no speech at all
            continue
        piece_mel = log_mel_spectrogram(piece.samples, mel_filters, padding=N_SAMPLES)
        frames = piece_mel.shape[-1] - N_FRAMES
        chunks.append(_Chunk(index, int(piece.offset * FRAMES_PER_SECOND), piece.offset, piece.duration,
                             pad_or_trim(piece_mel[:, :frames], N_FRAMES), language))
    return chunks


def transcribe_batch(
    model: Inference,
    audios: Sequence[Union[str, os.PathLike, np.ndarray]],
    *,
    mel_filters,
    tokenizer_path,
    batch_size: int = 8,
    temperature: Union[float, Tuple[float, ...]] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
    compression_ratio_threshold: Optional[float] = 2.4,
    logprob_threshold: Optional[float] = -1.0,
    no_speech_threshold: Optional[float] = 0.6,
    initial_prompt: Optional[str] = None,
    rng: Optional[np.random.Generator] = None,
    vad_filter: bool = False,
    vad_parameters: Union[None, dict, VadOptions] = None,
    **decode_options,
) -> List[dict]:
    """Transcribe several inputs at once; returns one whisper.transcribe-style dict per input.

    audios: file paths (anything ffmpeg reads) or float32 16 kHz mono samples. batch_size: chunks per
    batch, as faster-whisper's (each chunk's beams or best-of samples are decoder rows of the batch).
    decode_options: fields of DecodingOptions (language, task, without_timestamps, beam_size ...). The language, when not given, is detected per input on its first 30 s (of its
    speech, with vad_filter). vad_filter: batch the speech chunks Silero VAD finds instead of the 30 s
    grid; vad_parameters: runtime.vad.VadOptions' fields (faster-whisper's names).
    """
    if batch_size < 1:
        raise DecodingError(f"batch_size must be at least 1, got {batch_size}")
    decode_options.pop("fp16", None)  # the artifacts decide precision
    decode_options.pop("verbose", None)  # nothing is printed per segment here
    if decode_options.pop("condition_on_previous_text", False):
        raise DecodingError("batched transcription does not condition on previous text; "
                            "pass condition_on_previous_text=False or use transcribe")
    temperatures = [temperature] if isinstance(temperature, (int, float)) else list(temperature)
    if not temperatures:
        raise DecodingError("temperature must be a number or a non-empty sequence of numbers")
    check_decode_options(temperatures, decode_options)
    vad_options = batched_vad_options(vad_parameters) if vad_filter else None
    if isinstance(mel_filters, (str, os.PathLike)):
        mel_filters = load_mel_filters(mel_filters, model.dims.n_mels)
    time_precision = (N_FRAMES // model.dims.n_audio_ctx) * HOP_LENGTH / SAMPLE_RATE

    chunks: List[_Chunk] = []
    languages: List[Optional[str]] = []  # None: detected by the decoding of the input's first chunk
    own_chunks: List[List[_Chunk]] = []  # each input's chunks
    speech: List[Optional[List[dict]]] = []  # each input's speech chunks (samples), with VAD
    for index, audio in enumerate(audios):
        if isinstance(audio, (str, os.PathLike)):
            audio = load_audio(audio)
        audio = np.asarray(audio, dtype=np.float32)
        speech.append(None if vad_options is None else speech_timestamps(audio, vad_options))
        # the language is detected on the first 30 s of the input, or of its speech (silence when none)
        audible = audio if vad_options is None else \
            np.concatenate([audio[c["start"]:c["end"]] for c in speech[-1]] or [audio[:0]])
        mel = log_mel_spectrogram(audible, mel_filters, padding=N_SAMPLES)
        language = decode_options.get("language") or (None if model.is_multilingual else "en")
        own = _input_chunks(index, audio, mel, speech[-1], mel_filters, language)
        chunks += own
        own_chunks.append(own)
        # Where the first chunk is the detection's window, its decoding detects the language from the
        # chunk's own encoding (DecodingTask, language None), as faster-whisper reuses its detection's
        # encoder output, instead of encoding the window twice. A shorter input's detection window is
        # padded with silence's log-mel, its first chunk with zeros: that one is detected on its own.
        window = pad_or_trim(mel, N_FRAMES) if language is None else None
        if window is not None and not (own and np.array_equal(own[0].mel, window)):
            _, probs = detect_language(model, window, tokenizer_path=tokenizer_path)
            language = max(probs, key=probs.get)
            for chunk in own:
                chunk.language = language
        languages.append(language)

    task = decode_options.get("task", "transcribe")
    tokenizers: Dict[str, object] = {}

    def tokenizer_of(language: str):
        if language not in tokenizers:
            try:
                tokenizers[language] = get_tokenizer(tokenizer_path, model.is_multilingual,
                                                     num_languages=model.num_languages, language=language, task=task)
            except TokenizerError as exc:
                raise DecodingError(str(exc)) from exc
        return tokenizers[language]

    for language in set(languages) - {None}:
        tokenizer_of(language)  # an unknown language fails before any decoding
    base = {**decode_options}
    if initial_prompt is not None:  # the text's tokens do not depend on the language
        base["prompt"] = tokenizer_of(next((x for x in languages if x is not None), "en")).encode(
            " " + initial_prompt.strip())

    def decode_group(group: List[_Chunk], options) -> List[DecodingResult]:
        if joins(options) and hasattr(model, "row_batch"):
            # greedy: rows of a running batch, a finished chunk's row taken by the next at once
            return decode_windows(model, [c.mel for c in group], options, tokenizer_path=tokenizer_path,
                                  max_rows=batch_size)
        # batch_size chunks a batch, as faster-whisper's batch_size, each with its beams (or best-of
        # samples): 8 chunks x 5 beams are 40 decoder rows, whose step reads the weights once
        decoded = []
        for start in range(0, len(group), batch_size):
            decoded += decode(model, np.stack([c.mel for c in group[start:start + batch_size]]), options,
                              tokenizer_path=tokenizer_path, rng=rng)
        return decoded

    pending = chunks
    for t in temperatures:
        failed: List[_Chunk] = []
        decoded: List[Tuple[_Chunk, DecodingResult]] = []
        # the inputs whose language is not known yet: their first chunks detect it as they decode
        undetected = [own_chunks[i][0] for i, language in enumerate(languages) if language is None]
        if undetected:
            group_results = decode_group(undetected, options_at_temperature(dict(base, language=None), t))
            for chunk, result in zip(undetected, group_results):
                languages[chunk.source] = result.language
                for other in own_chunks[chunk.source]:
                    other.language = result.language
                decoded.append((chunk, result))
        detecting = {id(c) for c in undetected}
        rest = [c for c in pending if id(c) not in detecting]
        for language in sorted({c.language for c in rest}):
            group = [c for c in rest if c.language == language]
            decoded += zip(group, decode_group(group, options_at_temperature(dict(base, language=language), t)))
        for chunk, result in decoded:
            chunk.result = result
            if needs_fallback(result, compression_ratio_threshold, logprob_threshold, no_speech_threshold):
                failed.append(chunk)
        failed_ids = {id(c) for c in failed}
        pending = [c for c in chunks if id(c) in failed_ids]
        if not pending:
            break

    outputs = []
    for index, language in enumerate(languages):
        tokenizer = tokenizer_of(language)
        segments: List[dict] = []
        for chunk in (c for c in chunks if c.source == index):
            if is_silent(chunk.result, no_speech_threshold, logprob_threshold):
                continue  # whisper skips such a window
            segments.extend(_segments(chunk, tokenizer, time_precision))
        for i, segment in enumerate(segments):
            segment["id"] = i
        output = {"text": "".join(s["text"] for s in segments),
                  "segments": [{"id": s.pop("id"), **s} for s in segments], "language": language}
        if speech[index] is not None:
            restore_timestamps(output, speech[index])  # from the joined speech to the input's timeline
        outputs.append(output)
    return outputs


def batched_vad_options(parameters: Union[None, dict, VadOptions]) -> VadOptions:
    """The VAD options of batched mode: faster-whisper's pipeline defaults for what is not given, and no
    speech chunk longer than a window (faster-whisper overrides max_speech_duration_s; refused here)."""
    options = VadOptions.from_parameters(parameters, **BATCHED_VAD_DEFAULTS)
    if options.max_speech_duration_s > BATCHED_VAD_DEFAULTS["max_speech_duration_s"]:
        raise VadError(f"VAD max_speech_duration_s is at most 30 in batched mode (a speech chunk must fit one "
                       f"window), got {options.max_speech_duration_s!r}")
    return options
