"""Batched transcription of many inputs: fixed 30 s chunks of every file decoded together.

`whisper.transcribe` decodes one window at a time because each window depends on the one before:
the next window starts where the last complete segment ended, and the previous text conditions
it. A batch cannot wait for that. This mode cuts every input into fixed 30 s chunks (the last one
shorter) and decodes the chunks of all inputs `batch_size` at a time, so one decoder step reads
the weights once for the whole batch. That is how faster-whisper's BatchedInferencePipeline
works too. The result differs from `transcribe` in two ways:
- chunks do not move with the timestamps: a segment cut by a chunk boundary stays cut;
- no conditioning on previous text (every chunk gets the same `initial_prompt`, if any).
Without timestamps and with condition_on_previous_text=False, `transcribe` moves by whole windows
as well, so both give the same tokens (tested). Temperature fallback works per chunk: the chunks
that fail at one temperature are decoded again, together, at the next.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from runtime.audio import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, load_audio, load_mel_filters, \
    log_mel_spectrogram, pad_or_trim
from runtime.decoding import DecodingError, DecodingResult, decode, detect_language
from runtime.inference import Inference
from runtime.longform import check_decode_options, is_silent, needs_fallback, options_at_temperature, \
    split_window
from runtime.tokenizer import TokenizerError, get_tokenizer


@dataclass
class _Chunk:
    source: int  # index of the input
    seek: int  # first mel frame
    frames: int  # mel frames of audio in it (N_FRAMES but for the last chunk)
    mel: np.ndarray
    language: str
    result: Optional[DecodingResult] = None


def _segments(chunk: _Chunk, tokenizer, time_precision: float) -> List[dict]:
    """A chunk's segments: split at consecutive timestamp tokens, as whisper.transcribe splits a window."""
    result = chunk.result
    pieces, _ = split_window(np.asarray(result.tokens, dtype=np.int64), tokenizer.timestamp_begin,
                             float(chunk.seek * HOP_LENGTH / SAMPLE_RATE),
                             float(chunk.frames * HOP_LENGTH / SAMPLE_RATE), time_precision)
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
    **decode_options,
) -> List[dict]:
    """Transcribe several inputs at once; returns one whisper.transcribe-style dict per input.

    audios: file paths (anything ffmpeg reads) or float32 16 kHz mono samples. batch_size: chunks
    per decoder batch. decode_options: fields of DecodingOptions (language, task, without_timestamps,
    beam_size ...). The language, when not given, is detected per input on its first 30 s.
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
    if isinstance(mel_filters, (str, os.PathLike)):
        mel_filters = load_mel_filters(mel_filters, model.dims.n_mels)
    time_precision = (N_FRAMES // model.dims.n_audio_ctx) * HOP_LENGTH / SAMPLE_RATE

    chunks: List[_Chunk] = []
    languages: List[str] = []
    for index, audio in enumerate(audios):
        if isinstance(audio, (str, os.PathLike)):
            audio = load_audio(audio)
        mel = log_mel_spectrogram(np.asarray(audio, dtype=np.float32), mel_filters, padding=N_SAMPLES)
        content_frames = mel.shape[-1] - N_FRAMES
        language = decode_options.get("language")
        if language is None:
            if model.is_multilingual:
                _, probs = detect_language(model, pad_or_trim(mel, N_FRAMES), tokenizer_path=tokenizer_path)
                language = max(probs, key=probs.get)
            else:
                language = "en"
        languages.append(language)
        for seek in range(0, content_frames, N_FRAMES):
            frames = min(N_FRAMES, content_frames - seek)
            chunks.append(_Chunk(index, seek, frames, pad_or_trim(mel[:, seek:seek + frames], N_FRAMES), language))

    tokenizers: Dict[str, object] = {}
    for language in set(languages):
        try:
            tokenizers[language] = get_tokenizer(tokenizer_path, model.is_multilingual,
                                                 num_languages=model.num_languages, language=language,
                                                 task=decode_options.get("task", "transcribe"))
        except TokenizerError as exc:
            raise DecodingError(str(exc)) from exc
    base = {**decode_options}
    if initial_prompt is not None:
        base["prompt"] = tokenizers[languages[0]].encode(" " + initial_prompt.strip()) if languages else None

    pending = chunks
    for t in temperatures:
        failed: List[_Chunk] = []
        for language in sorted({c.language for c in pending}):
            group = [c for c in pending if c.language == language]
            for start in range(0, len(group), batch_size):
                batch = group[start:start + batch_size]
                results = decode(model, np.stack([c.mel for c in batch]),
                                 options_at_temperature(dict(base, language=language), t),
                                 tokenizer_path=tokenizer_path, rng=rng)
                for chunk, result in zip(batch, results):
                    chunk.result = result
                    if needs_fallback(result, compression_ratio_threshold, logprob_threshold, no_speech_threshold):
                        failed.append(chunk)
        pending = failed
        if not pending:
            break

    outputs = []
    for index, language in enumerate(languages):
        tokenizer = tokenizers[language]
        segments: List[dict] = []
        for chunk in (c for c in chunks if c.source == index):
            if is_silent(chunk.result, no_speech_threshold, logprob_threshold):
                continue  # whisper skips such a window
            segments.extend(_segments(chunk, tokenizer, time_precision))
        for i, segment in enumerate(segments):
            segment["id"] = i
        outputs.append({"text": "".join(s["text"] for s in segments),
                        "segments": [{"id": s.pop("id"), **s} for s in segments], "language": language})
    return outputs
