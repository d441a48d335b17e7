"""Transcribe with Whisper from prebuilt MAX artifacts: no compiler, no torch."""

from .api import load_model, transcribe, transcribe_batch

__all__ = ["load_model", "transcribe", "transcribe_batch"]
