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


# A known English paragraph (about a minute spoken): the demo's sample, and the reference of its
# word error rate.
DEMO_PARAGRAPH = (
    "Speech recognition has come a long way. Early systems knew a few hundred words and needed a quiet "
    "room and a patient speaker. Today a model trained on many thousands of hours of audio can follow "
    "a lecture, a meeting or a phone call, in many languages, and write down what was said with "
    "punctuation and timestamps. The model listens to thirty seconds of sound at a time, turns it into "
    "a picture of its frequencies, and predicts the words one after another. A compiler can make that "
    "work faster without changing a single word of the result. It plans the arithmetic ahead of time, "
    "keeps the numbers close to the processor, and skips the work that is not needed. The transcript "
    "you read below was made that way, from a model that fits in a small file on your own computer."
)


def speak(text: str, path: Path, voice: str = "en-us", words_per_minute: int = 150) -> Path:
    """One passage, spoken by espeak-ng, as a 16 kHz mono WAV."""
    require_tools()
    raw = Path(path).with_suffix(".espeak.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(words_per_minute), "-w", str(raw), text], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    convert_audio(raw, path, ["-ar", "16000", "-ac", "1"])
    raw.unlink()
    return Path(path)


def varied_speech(path: Path) -> tuple[Path, str]:
    """About 100 s of English in several voices and speeds, with silences, a noisy passage and a tone,
    as a 16 kHz mono WAV. Returns (path, the words spoken, in order)."""
    import numpy as np

    rng = np.random.default_rng(7)
    rate = 16000
    pieces, spoken = [], []

    def passage(sentences, voice, wpm, noise=0.0):
        text = " ".join(SENTENCES[i % len(SENTENCES)] for i in sentences)
        wav = speak(text, Path(path).with_suffix(f".{len(pieces)}.wav"), voice, wpm)
        samples = _read_wav(wav)
        wav.unlink()
        if noise:
            samples = samples + rng.normal(0.0, noise * np.abs(samples).max(), samples.shape)
        pieces.append(samples)
        spoken.append(text)

    def silence(seconds):
        pieces.append(np.zeros(int(seconds * rate)))

    passage(range(0, 4), "en-us", 150)
    silence(3.0)
    passage(range(4, 7), "en-gb", 175)
    silence(1.0)
    passage(range(7, 9), "en-us", 140, noise=0.05)  # white noise at about a twentieth of the peak
    silence(0.5)
    pieces.append(0.3 * np.sin(2 * np.pi * 440.0 * np.arange(2 * rate) / rate))  # a 2 s tone
    silence(6.0)
    passage(range(9, 12), "en-gb-x-rp", 130)
    silence(2.0)
    passage(range(12, 16), "en-us", 190)
    _write_wav(Path(path), np.concatenate(pieces))
    return Path(path), " ".join(spoken)


def _read_wav(path: Path):
    import wave

    import numpy as np

    with wave.open(str(path)) as f:
        return np.frombuffer(f.readframes(f.getnframes()), np.int16).astype(np.float64) / 32768.0


def _write_wav(path: Path, samples) -> None:
    import wave

    import numpy as np

    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes((np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16).tobytes())


def convert_audio(source: Path, target: Path, ffmpeg_args: list[str]) -> Path:
    """Transcode with ffmpeg, e.g. ["-ar", "8000", "-ac", "1"] or ["-ar", "44100", "-ac", "2"]."""
    require_tools()
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(source), *ffmpeg_args, str(target)],
                   check=True)
    return Path(target)


if __name__ == "__main__":
    import sys

    # audio_samples.py OUT.wav [--demo]: --demo speaks DEMO_PARAGRAPH and writes it beside as OUT.txt
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "speech.wav")
    if "--demo" in sys.argv[2:]:
        out.parent.mkdir(parents=True, exist_ok=True)
        speak(DEMO_PARAGRAPH, out)
        out.with_suffix(".txt").write_text(DEMO_PARAGRAPH + "\n")
    else:
        synthesize_speech(out)
    print(out)
