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
