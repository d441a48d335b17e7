"""Synthesized speech for tests and examples, so nothing depends on files outside the project.

espeak-ng speaks a fixed text, ffmpeg turns it into the container and rate asked for. The text is
cycled to any length, so a sample can span several 30 s windows.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the quiet river bank.",
    "Speech recognition turns spoken words into written text, one window at a time.",
    "A compiler reads a program and writes another program that runs faster.",
    "On a clear night you can see thousands of stars above the mountains.",
    "The library opens at nine in the morning and closes at six in the evening.",
    "Whisper listens to thirty seconds of audio and predicts the words it hears.",
    "Every test should assert something that can fail, or it proves nothing at all.",
    "The train to the coast leaves from platform four every hour on the hour.",
    "Fresh bread, cheese and apples make a simple lunch for a long walk.",
    "Numbers like three hundred and twelve are harder to hear than short words.",
    "The meeting was moved to Thursday because half of the team was travelling.",
    "Rain is expected tomorrow afternoon, so bring an umbrella to the park.",
]


def require_tools() -> None:
    missing = [tool for tool in ("espeak-ng", "ffmpeg") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"synthesizing test audio needs {', '.join(missing)} (apt-get install {' '.join(missing)})")


def synthesize_speech(path: Path, n_sentences: int = 15, words_per_minute: int = 150) -> Path:
    """Write a 16 kHz mono WAV of `n_sentences` sample sentences (about 4.8 s each: 15 make 72 s)."""
    require_tools()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.with_suffix(".espeak.wav")
    text = " ".join(SENTENCES[i % len(SENTENCES)] for i in range(n_sentences))
    subprocess.run(["espeak-ng", "-s", str(words_per_minute), "-w", str(raw), text], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    convert_audio(raw, path, ["-ar", "16000", "-ac", "1"])
    raw.unlink()
    return path


def convert_audio(source: Path, target: Path, ffmpeg_args: list[str]) -> Path:
    """Transcode with ffmpeg, e.g. ["-ar", "8000", "-ac", "1"] or ["-ar", "44100", "-ac", "2"]."""
    require_tools()
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(source), *ffmpeg_args, str(target)],
                   check=True)
    return Path(target)


if __name__ == "__main__":
    import sys

    print(synthesize_speech(Path(sys.argv[1] if len(sys.argv) > 1 else "speech.wav")))
