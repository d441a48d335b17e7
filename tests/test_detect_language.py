"""`runtime detect-language`: openai-whisper's language detection, from prebuilt artifacts.

The probabilities must equal those of openai-whisper's `model.detect_language` on the torch model
(fed the window whisper.transcribe feeds it: the first 3000 frames of the log-mel of the whole
file with 30 s of silence appended) within 1e-4, with the same most probable language. Where
openai-whisper's own top two languages are closer than the near-tie epsilon of
tests/test_transcribe_parity.py, a different pick is reported as a tie.
"""

from __future__ import annotations

import json
import math
import wave

import numpy as np
import pytest
from audio_samples import synthesize_speech
from conftest import run_tool
from test_transcribe_parity import TIE_EPSILON


@pytest.fixture(scope="module")
def silence(tmp_path_factory):
    path = tmp_path_factory.mktemp("silence") / "silence.wav"
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes(np.zeros(16000 * 5, dtype=np.int16).tobytes())
    return path


@pytest.fixture(scope="module")
def short_speech(tmp_path_factory):
    return synthesize_speech(tmp_path_factory.mktemp("short") / "short.wav", n_sentences=3)


def detect_cli(model_dir, *audio, extra=(), check=True):
    return run_tool("runtime", "detect-language", *map(str, audio), "--model", str(model_dir), *extra, check=check)


def whisper_probabilities(torch_model, path) -> dict[str, float]:
    import whisper
    from whisper.audio import N_FRAMES, N_SAMPLES

    mel = whisper.log_mel_spectrogram(str(path), torch_model.dims.n_mels, padding=N_SAMPLES)
    _, probabilities = torch_model.detect_language(whisper.pad_or_trim(mel, N_FRAMES))
    return probabilities


def assert_one_line_error(result, *needles):
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_probabilities_match_openai_whisper(tiny_model_dir, torch_tiny, speech_72s, short_speech, silence):
    result = detect_cli(tiny_model_dir, speech_72s, short_speech, silence, extra=["--json"])
    ours = {entry["audio"]: entry for entry in json.loads(result.stdout)}
    assert list(ours) == [str(speech_72s), str(short_speech), str(silence)]
    for path in (speech_72s, short_speech, silence):
        reference = whisper_probabilities(torch_tiny, path)
        entry = ours[str(path)]
        probabilities = entry["probabilities"]
        # openai-whisper's dict order comes from iterating a set of special tokens (it varies with
        # the hash seed); ours is its LANGUAGES order
        assert set(probabilities) == set(reference)
        assert list(probabilities)[:3] == ["en", "zh", "de"]
        assert len(reference) == 99 and sum(reference.values()) == pytest.approx(1.0, abs=1e-4)
        worst = max(abs(probabilities[code] - p) for code, p in reference.items())
        assert worst < 1e-4, f"{path.name}: probabilities differ by up to {worst:.2e}"
        first, second = sorted(reference.values(), reverse=True)[:2]
        expected = max(reference, key=reference.get)
        margin = math.log(first) - math.log(second)  # the gap between their logits
        if entry["language"] != expected:
            assert margin < TIE_EPSILON, f"{path.name}: we detect {entry['language']}, openai-whisper {expected}"
            print(f"\n{path.name}: near-tie between {expected} and {entry['language']} (logit gap {margin:.2e})")
        else:
            print(f"\n{path.name}: {expected} ({first:.4f}), max probability difference {worst:.2e}")
        assert entry["language"] == max(probabilities, key=probabilities.get)


def test_text_output_lists_the_top_languages(tiny_model_dir, short_speech):
    result = detect_cli(tiny_model_dir, short_speech, extra=["--top", "3"])
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4, result.stdout
    listed = [(line.split()[0], float(line.split()[1])) for line in lines[1:]]
    assert [p for _, p in listed] == sorted((p for _, p in listed), reverse=True)
    assert lines[0].startswith(f"{short_speech}: ") and lines[0].endswith(f"({listed[0][0]})")

    everything = json.loads(detect_cli(tiny_model_dir, short_speech, extra=["--json"]).stdout)[0]["probabilities"]
    top3 = sorted(everything, key=everything.get, reverse=True)[:3]
    assert [code for code, _ in listed] == top3
    assert all(p == pytest.approx(everything[code], abs=1e-6) for code, p in listed)


def test_english_only_model_is_refused(isolated_copy, tiny_model_dir, short_speech):
    """openai-whisper raises for a model without language tokens; the command says so in one line."""
    model = isolated_copy(tiny_model_dir)
    config = json.loads((model / "model.json").read_text())
    config["is_multilingual"] = False
    (model / "model.json").write_text(json.dumps(config))
    result = detect_cli(model, short_speech, check=False)
    assert_one_line_error(result, "English-only")
    assert result.stdout == ""


def test_missing_audio(tiny_model_dir, tmp_path):
    assert_one_line_error(detect_cli(tiny_model_dir, tmp_path / "nope.wav", check=False), "not found", "nope.wav")


def test_unreadable_audio_fails_but_the_others_are_detected(tiny_model_dir, short_speech, tmp_path):
    garbage = tmp_path / "garbage.mp3"
    garbage.write_bytes(b"\x00\x01 definitely not audio " * 64)
    result = detect_cli(tiny_model_dir, garbage, short_speech, extra=["--json"], check=False)
    assert_one_line_error(result, "garbage.mp3")
    assert [entry["audio"] for entry in json.loads(result.stdout)] == [str(short_speech)]


def test_missing_model(tmp_path, short_speech):
    assert_one_line_error(detect_cli(tmp_path / "no-model", short_speech, check=False), "make convert")


def test_bad_top(tiny_model_dir, short_speech):
    assert_one_line_error(detect_cli(tiny_model_dir, short_speech, extra=["--top", "0"], check=False), "--top")
