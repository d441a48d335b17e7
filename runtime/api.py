"""The Python API: load prebuilt artifacts once, transcribe many inputs."""

from __future__ import annotations

import os
from pathlib import Path

from .audio import LogMelPrefetch
from .engine import WhisperModel
from .longform import AudioSource, Transcription
from .options import TranscribeOptions


def load_model(model_dir: str | os.PathLike, device: str = "cpu", threads: int | None = None,
               compute_type: str = "exact") -> WhisperModel:
    """Load `artifacts/<name>` compiled for `device` ("cpu" or "gpu"); never compiles.

    compute_type "exact" runs the checkpoint's own values (openai-whisper's tokens); "int8" the
    decoder's int8 build (`make compile DECODER_WEIGHTS=int8`, CPU): faster, not token-identical.

    The process is left alone unless `threads` is given: then the whole process is pinned to that
    many CPUs, since MAX 26.7 sizes its one CPU thread pool from the process's CPU affinity and
    cannot size it per session (runtime.engine.limit_threads says why); only before the first model.
    """
    return WhisperModel(model_dir, device=device, threads=threads, compute_type=compute_type)


def transcribe(model: WhisperModel | str | os.PathLike, audio: AudioSource, **options) -> dict:
    """Transcribe like `whisper.transcribe(model, audio, **options)`: returns {"text", "segments", "language"}.

    `model` is a loaded WhisperModel or an artifact folder; `audio` a file path (anything ffmpeg
    reads), the file's bytes or a binary file object, or float32 16 kHz mono samples. `options` are
    whisper.transcribe's keywords (runtime.options.TranscribeOptions), checked before any work.
    """
    return start_transcription(model, audio, TranscribeOptions.from_kwargs(**options)).result()


def start_transcription(model: WhisperModel | str | os.PathLike, audio: AudioSource, options: TranscribeOptions,
                        *, decode_fn=None) -> Transcription:
    """A transcription that yields each segment as soon as its window is decoded (runtime.longform):
    `t = start_transcription(model, audio, TranscribeOptions.from_kwargs(...))`; `t.info.language`;
    `for segment in t: ...`; `t.result()` is transcribe's dict. decode_fn replaces
    runtime.decoding.decode for the windows (the server's batcher)."""
    from .longform import start_transcription as start_loop

    if isinstance(audio, (str, os.PathLike)):
        audio = str(Path(audio))
    if not isinstance(model, WhisperModel) and isinstance(model, (str, os.PathLike)):
        prefetch = prefetch_log_mel(model, audio) if isinstance(audio, str) and not options.vad_filter else None
        try:
            model = load_model(model)
        except BaseException:
            if prefetch is not None:
                prefetch.cancel()
            raise
        audio = prefetch or audio
    return start_loop(model, audio, options, mel_filters=model.mel_filters, tokenizer_path=str(model.tokenizer_path),
                      decode_fn=decode_fn)


def prefetch_log_mel(model_dir: str | os.PathLike, audio: str | os.PathLike) -> LogMelPrefetch | None:
    """The log-mel of the audio file for the artifacts in `model_dir`, started now on a thread of its own
    (runtime.audio.LogMelPrefetch), to be passed to transcribe in place of the file: ffmpeg's decoding
    and the log-mel then overlap the model's loading (`runtime transcribe`, launch to first token on a
    2-core AMD EPYC, medians of two runs of 6-7 alternated launches: tiny.en 1.02 / 1.06 -> 0.91 / 0.99 s,
    base 1.53 / 1.45 -> 1.35 / 1.35 s). None where the artifacts' Mel filters cannot be read (load_model
    then says what is wrong)."""
    from contracts import ContractError, read_model_json

    from .audio import N_SAMPLES, AudioError, load_mel_filters

    model_dir = Path(model_dir)
    try:
        model = read_model_json(model_dir)
        filters = load_mel_filters(model_dir / model["mel_filters"]["file"], int(model["dims"]["n_mels"]))
    except (ContractError, AudioError, KeyError, TypeError, ValueError):
        return None
    return LogMelPrefetch(audio, filters, N_SAMPLES)


def transcribe_batch(model: WhisperModel | str | os.PathLike, audios, batch_size: int = 8, **options) -> list[dict]:
    """Transcribe many inputs, their fixed 30 s chunks (with vad_filter=True: their speech, in pieces of up
    to 30 s) decoded `batch_size` at a time (runtime/batched.py says how the result differs from
    `transcribe`). Returns one {"text", "segments", "language"} per input."""
    from .batched import transcribe_batch as transcribe_chunks

    if not isinstance(model, WhisperModel):
        model = load_model(model)
    audios = [str(Path(a)) if isinstance(a, (str, os.PathLike)) else a for a in audios]
    return transcribe_chunks(model, audios, mel_filters=model.mel_filters, tokenizer_path=str(model.tokenizer_path),
                             batch_size=batch_size, **options)
