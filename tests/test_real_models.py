"""Real weights, real-sounding speech: openai's tiny.en (from the registry package that ships it as a
faster-whisper folder) against openai-whisper on the very same weights.

The audio is synthesized here (tests/audio_samples.py varied_speech: several voices and speeds,
silences, a noisy passage, a tone), so the known text gives each transcript a word error rate: printed,
never asserted as a figure; what is asserted is that ours and openai-whisper's are the same, which
follows from the same tokens. Ties are reported by the rule of tests/test_transcribe_parity.py.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
import test_beam_parity as beam
from audio_samples import varied_speech
from test_transcribe_parity import TIE_EPSILON, assert_same_segments, first_divergence, record_ours, record_reference
from test_word_timestamps import assert_same_words

from bench.wer import word_error_rate


@pytest.fixture(scope="module")
def varied(work_dir):
    import whisper

    path, text = varied_speech(work_dir / "varied-speech.wav")
    return whisper.load_audio(str(path)), text


def record_temperatures(monkeypatch) -> list[float]:
    """The temperature of each of openai-whisper's decode calls (fallbacks sample: not comparable)."""
    import whisper.model

    temperatures: list[float] = []
    original = whisper.model.Whisper.decode

    def decode(self, mel, options):
        temperatures.append(options.temperature)
        return original(self, mel, options)

    monkeypatch.setattr(whisper.model.Whisper, "decode", decode)
    return temperatures


CASES = {
    # whisper.transcribe()'s defaults: greedy, the temperature fallback schedule, conditioning, timestamps
    "api-defaults": dict(),
    "word-timestamps": dict(word_timestamps=True),
    "hallucination-silence-threshold": dict(word_timestamps=True, hallucination_silence_threshold=1.0),
    "clip-timestamps": dict(clip_timestamps="3.5,40,52,80"),
    "initial-prompt": dict(initial_prompt="Sentences read aloud by a speech synthesizer, for a test."),
}


@pytest.mark.parametrize("case", list(CASES))
def test_real_tiny_en_matches_openai_whisper(case, monkeypatch, varied, real_tiny_en_runtime, real_tiny_en_torch):
    import whisper

    import runtime

    audio, text = varied
    options = dict(CASES[case], verbose=None)
    reference_calls = record_reference(monkeypatch)
    temperatures = record_temperatures(monkeypatch)
    reference = whisper.transcribe(real_tiny_en_torch, audio, fp16=False, **copy.deepcopy(options))
    our_calls, _ = record_ours(monkeypatch)
    ours = runtime.transcribe(real_tiny_en_runtime, audio, **options)

    sampled = next((i for i, t in enumerate(temperatures) if t > 0), None)
    if sampled is not None:  # the windows before the first fallback are still compared
        first_divergence(reference_calls[:sampled], our_calls[:sampled])
        pytest.fail(f"{case}: openai-whisper fell back to temperature {temperatures[sampled]} at decode {sampled}: "
                    "sampling is not comparable; the test audio should not need it")
    tie = first_divergence(reference_calls, our_calls)
    if tie is not None:
        print(f"\n{case}: near-tie at window {tie.window}, token {tie.index}: openai-whisper's top-2 logits "
              f"differ by {tie.margin:.2e} < {TIE_EPSILON}; it chose {tie.reference_token}, we chose {tie.our_token}")
        return
    assert ours["text"] == reference["text"] and ours["language"] == reference["language"] == "en"
    assert_same_segments(ours, reference)
    words = assert_same_words(ours["segments"], reference["segments"]) if options.get("word_timestamps") else 0
    tokens = sum(len(c.tokens) for c in reference_calls)
    print(f"\n{case}: {len(reference_calls)} decodes, {tokens} tokens, {len(ours['segments'])} segments, "
          f"{words} words identical; word error rate {100 * word_error_rate(text, ours['text']):.1f}% "
          "(the same as openai-whisper's)")
    assert len(reference_calls) >= 3 and tokens > 100
    if options.get("word_timestamps"):
        # real speech: many words a segment, unlike the random model's one
        assert words > 100 and max(len(s["words"]) for s in ours["segments"]) >= 8
    if case == "hallucination-silence-threshold":
        plain = whisper.transcribe(real_tiny_en_torch, audio, fp16=False, word_timestamps=True, verbose=None)
        print(f"  threshold 1.0: {len(reference['segments'])} segments; without it {len(plain['segments'])}")
    if case == "clip-timestamps":  # decoding starts at the first clip (a window may run past a clip's end)
        assert ours["segments"][0]["start"] >= 3.5 and all(s["start"] < 80.0 for s in ours["segments"])


def test_real_tiny_en_beam_search_cli_defaults(monkeypatch, varied, real_tiny_en_runtime, real_tiny_en_torch):
    """The whisper CLI's defaults: beam 5, best_of 5, the fallback schedule; every beam step compared."""
    import torch
    import whisper

    import runtime

    audio, text = varied
    audio = audio[: 46 * 16000]  # two windows: beam search on torch is slow
    options = dict(beam_size=5, best_of=5, verbose=None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference_windows = beam.record_reference(monkeypatch)
        temperatures = record_temperatures(monkeypatch)
        with contextlib.redirect_stdout(io.StringIO()):
            reference = whisper.transcribe(real_tiny_en_torch, audio, fp16=False, **options)
    finally:
        torch.set_num_threads(threads)
    our_windows, _ = beam.record_ours(monkeypatch)
    ours = runtime.transcribe(real_tiny_en_runtime, audio, **options)

    assert all(t == 0.0 for t in temperatures), f"openai-whisper fell back: {temperatures}"
    tie = beam.first_divergence(reference_windows, our_windows, 5)
    if tie is not None:
        print(f"\nbeam: near-tie at window {tie.window}, step {tie.step}: gap {tie.gap:.2e}; not compared further")
        return
    steps = sum(len(w.steps) for w in reference_windows)
    assert len(reference_windows) >= 2 and steps > 50
    assert ours["text"] == reference["text"]
    assert_same_segments(ours, reference)
    print(f"\nbeam 5: {len(reference_windows)} windows, {steps} beam steps identical; word error rate "
          f"{100 * word_error_rate(text[: len(text) // 2], ours['text']):.1f}% against the first half of the text")


def test_registry_folder_carries_openais_alignment_heads(real_tiny_en_dir):
    """The package's config.json heads are openai's table for tiny.en (word timestamps depend on them)."""
    from converter.official import alignment_heads
    from converter.registry import REGISTRY_MODELS

    model = json.loads((real_tiny_en_dir / "model.json").read_text())
    assert model["alignment_heads"] == alignment_heads("tiny.en", model["dims"])
    assert model["source"]["format"] == "ctranslate2"
    assert model["source"]["sha256"] == REGISTRY_MODELS["tiny.en"].sha256
    assert model["weights"]["dtypes"] == ["float16"] and model["tensor_count"] == 167


def test_real_transcript_is_speech(varied, real_tiny_en_runtime):
    """Not gibberish: the real model hears most of the words (the figure is printed; the bound is loose)."""
    import runtime

    audio, text = varied
    result = runtime.transcribe(real_tiny_en_runtime, audio, verbose=None)
    wer = word_error_rate(text, result["text"])
    print(f"\nreal tiny.en, {len(audio) / 16000:.0f} s of varied synthesized speech: word error rate {100 * wer:.1f}%")
    assert wer < 0.5
    assert np.isfinite(wer)
