"""The Python API: load prebuilt artifacts once, transcribe many inputs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .engine import WhisperModel


def load_model(model_dir: str | os.PathLike, device: str = "cpu", threads: int | None = None) -> WhisperModel:
    """Load `artifacts/<name>` compiled for `device` ("cpu" or "gpu"); never compiles."""
    return WhisperModel(model_dir, device=device, threads=threads)


def transcribe(model: WhisperModel | str | os.PathLike, audio: str | os.PathLike | np.ndarray, **options) -> dict:
    """Transcribe like `whisper.transcribe(model, audio, **options)`: returns {"text", "segments", "language"}.

    `model` is a loaded WhisperModel or an artifact folder; `audio` a file path (anything ffmpeg
    reads) or float32 16 kHz mono samples.
    """
    from .longform import transcribe as transcribe_loop

    if not isinstance(model, WhisperModel):
        model = load_model(model)
    if isinstance(audio, (str, os.PathLike)):
        audio = str(Path(audio))
    return transcribe_loop(model, audio, mel_filters=model.mel_filters, tokenizer_path=str(model.tokenizer_path),
                           **options)


def transcribe_batch(model: WhisperModel | str | os.PathLike, audios, batch_size: int = 8, **options) -> list[dict]:
    """Transcribe many inputs, their fixed 30 s chunks decoded `batch_size` at a time (runtime/batched.py
    says how the result differs from `transcribe`). Returns one {"text", "segments", "language"} per input."""
    from .batched import transcribe_batch as transcribe_chunks

    if not isinstance(model, WhisperModel):
        model = load_model(model)
    audios = [str(Path(a)) if isinstance(a, (str, os.PathLike)) else a for a in audios]
    return transcribe_chunks(model, audios, mel_filters=model.mel_filters, tokenizer_path=str(model.tokenizer_path),
                             batch_size=batch_size, **options)
