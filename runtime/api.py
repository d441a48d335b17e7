"""The Python API: load prebuilt artifacts once, transcribe many inputs."""

from __future__ import annotations

import os
from pathlib import Path

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

    if not isinstance(model, WhisperModel) and isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    if isinstance(audio, (str, os.PathLike)):
        audio = str(Path(audio))
    return start_loop(model, audio, options, mel_filters=model.mel_filters, tokenizer_path=str(model.tokenizer_path),
                      decode_fn=decode_fn)


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
