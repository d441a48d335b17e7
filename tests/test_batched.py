"""runtime.transcribe_batch: fixed 30 s chunks of several inputs decoded as one batch."""

from __future__ import annotations

import numpy as np
import pytest

from audio_samples import synthesize_speech

OPTIONS = dict(language="en", temperature=0.0, condition_on_previous_text=False)


@pytest.fixture(scope="module")
def short_speech(work_dir):
    return synthesize_speech(work_dir / "speech-short.wav", n_sentences=3)


def test_without_timestamps_equals_transcribe_per_file(tiny_runtime, speech_72s, short_speech):
    """Without timestamps or conditioning, transcribe also moves by whole windows: same segments."""
    import runtime

    files = [speech_72s, short_speech, speech_72s]
    batched = runtime.transcribe_batch(tiny_runtime, files, batch_size=4, without_timestamps=True, **OPTIONS)
    assert len(batched) == len(files)
    for path, ours in zip(files, batched):
        sequential = runtime.transcribe(tiny_runtime, path, without_timestamps=True, batch_windows=1, **OPTIONS)
        assert [s["tokens"] for s in ours["segments"]] == [s["tokens"] for s in sequential["segments"]]
        assert ours["segments"] == sequential["segments"]
        assert ours["text"] == sequential["text"] and ours["language"] == sequential["language"]


def test_batch_size_counts_chunks_with_their_beams(real_tiny_en_runtime, speech_72s, short_speech, monkeypatch):
    """batch_size counts chunks, as faster-whisper's: with beam search each batch holds batch_size chunks
    (beam_size decoder rows each), and every chunk decodes as it does alone (batch_size 1): the step's
    rows do not depend on each other, and the rows of a chunk whose candidates are complete leave the
    batch without changing the others'."""
    import runtime
    import runtime.batched as batched
    from runtime.engine import MaxDecoderSession

    files = [speech_72s, short_speech]  # 3 chunks and 1
    batches, reorders = [], []
    decode, reorder = batched.decode, MaxDecoderSession.reorder

    def counted_decode(model, mel, options, **kwargs):
        batches.append((mel.shape[0], options.beam_size))
        return decode(model, mel, options, **kwargs)

    def counted_reorder(session, source_indices):
        reorders.append((len(session.kv_rows), len(source_indices)))
        return reorder(session, source_indices)

    monkeypatch.setattr(batched, "decode", counted_decode)
    monkeypatch.setattr(MaxDecoderSession, "reorder", counted_reorder)
    options = dict(OPTIONS, beam_size=5, without_timestamps=True)
    together = runtime.transcribe_batch(real_tiny_en_runtime, files, batch_size=3, **options)
    assert batches == [(3, 5), (1, 5)]
    assert any(after < before for before, after in reorders)  # a chunk finished first: its rows left
    batches.clear()
    alone = runtime.transcribe_batch(real_tiny_en_runtime, files, batch_size=1, **options)
    assert batches == [(1, 5)] * 4
    assert together == alone and all(r["text"].strip() for r in together)


def test_language_is_detected_from_the_first_chunks_encoding(tiny_runtime, speech_72s, short_speech, monkeypatch):
    """Without a language, an input's first chunk detects it as it decodes, from its one encoding (a
    shorter input's detection window is not its chunk: detected apart): the language
    runtime.decoding.detect_language gives, and the segments of a run that is given that language."""
    import runtime
    from runtime.audio import N_FRAMES, N_SAMPLES, load_audio, log_mel_spectrogram, pad_or_trim
    from runtime.decoding import detect_language

    files = [speech_72s, short_speech]
    expected = []
    for path in files:
        mel = log_mel_spectrogram(load_audio(str(path)), tiny_runtime.mel_filters, padding=N_SAMPLES)
        _, probs = detect_language(tiny_runtime, pad_or_trim(mel, N_FRAMES))
        expected.append(max(probs, key=probs.get))
    encoded = []
    encode = tiny_runtime.encode

    def counted_encode(mel):
        encoded.append(mel.shape[0])
        return encode(mel)

    monkeypatch.setattr(tiny_runtime, "encode", counted_encode)
    options = dict(OPTIONS, language=None)
    detected = runtime.transcribe_batch(tiny_runtime, files, batch_size=4, without_timestamps=True, **options)
    monkeypatch.undo()
    assert [r["language"] for r in detected] == expected
    assert sum(encoded) == 3 + 1 + 1  # the chunks (72 s: 3, the short file: 1), the short file's window
    for path, ours, language in zip(files, detected, expected):
        given, = runtime.transcribe_batch(tiny_runtime, [path], batch_size=4, without_timestamps=True,
                                          **dict(OPTIONS, language=language))
        assert ours["segments"] == given["segments"]


def test_with_timestamps_each_chunk_decodes_as_alone(tiny_runtime, speech_72s, short_speech):
    """With timestamps the chunks stay on the 30 s grid; batching them changes no chunk's tokens."""
    import runtime
    from runtime.audio import N_FRAMES, N_SAMPLES, load_audio, log_mel_spectrogram, pad_or_trim
    from runtime.decoding import DecodingOptions, decode

    files = [short_speech, speech_72s]
    batched = runtime.transcribe_batch(tiny_runtime, files, batch_size=3, **OPTIONS)
    for path, ours in zip(files, batched):
        mel = log_mel_spectrogram(load_audio(str(path)), tiny_runtime.mel_filters, padding=N_SAMPLES)
        content_frames = mel.shape[-1] - N_FRAMES
        by_chunk: dict[int, list[int]] = {}
        for segment in ours["segments"]:
            assert segment["seek"] % N_FRAMES == 0
            chunk_start = segment["seek"] / 100
            assert chunk_start <= segment["start"] < segment["end"] <= chunk_start + 30.0
            by_chunk.setdefault(segment["seek"], []).extend(segment["tokens"])
        assert by_chunk, "no segments"
        for seek, tokens in by_chunk.items():
            frames = min(N_FRAMES, content_frames - seek)
            alone = decode(tiny_runtime, pad_or_trim(mel[:, seek:seek + frames], N_FRAMES),
                           DecodingOptions(language="en", temperature=0.0),
                           tokenizer_path=str(tiny_runtime.tokenizer_path))
            # a chunk's segments hold its tokens in order, less those of cleared (empty) segments
            assert _is_subsequence(tokens, alone.tokens), f"chunk at {seek}"
        assert any(by_chunk.values())


def _is_subsequence(part: list[int], whole: list[int]) -> bool:
    it = iter(whole)
    return all(any(t == w for w in it) for t in part)


def test_bad_options_are_refused(tiny_runtime, short_speech):
    import runtime
    from runtime.decoding import DecodingError

    with pytest.raises(DecodingError, match="batch_size"):
        runtime.transcribe_batch(tiny_runtime, [short_speech], batch_size=0, language="en")
    with pytest.raises(DecodingError, match="condition on previous text"):
        runtime.transcribe_batch(tiny_runtime, [short_speech], language="en", condition_on_previous_text=True)
    with pytest.raises(DecodingError, match="unknown decoding option"):
        runtime.transcribe_batch(tiny_runtime, [short_speech], language="en", no_such_option=1)


def test_samples_and_paths_mix(tiny_runtime, short_speech):
    import runtime
    from runtime.audio import load_audio

    samples = load_audio(str(short_speech))
    from_path, from_samples = runtime.transcribe_batch(tiny_runtime, [short_speech, samples],
                                                       without_timestamps=True, **OPTIONS)
    assert from_path == from_samples
    assert np.isfinite(from_path["segments"][0]["avg_logprob"])


def test_cli_batch_size_writes_what_the_api_returns(tiny_model_dir, tiny_runtime, speech_72s, short_speech, tmp_path):
    import json

    import runtime
    from conftest import run_tool

    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"not audio at all")
    out = tmp_path / "out"
    result = run_tool("runtime", "transcribe", str(short_speech), str(broken), str(speech_72s),
                      "--model", str(tiny_model_dir), "--batch-size", "4", "--without-timestamps",
                      "--beam-size", "none", "--language", "en", "--temperature-increment-on-fallback", "none",
                      "--verbose", "False", "-f", "json", "-o", str(out), check=False)
    assert result.returncode == 1
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == \
        [line for line in result.stderr.splitlines() if "broken.wav" in line and line.startswith("error:")]
    expected = runtime.transcribe_batch(tiny_runtime, [short_speech, speech_72s], batch_size=4,
                                        without_timestamps=True, **OPTIONS)
    for path, want in zip([short_speech, speech_72s], expected):
        written = json.loads((out / f"{path.stem}.json").read_text())
        assert [s["tokens"] for s in written["segments"]] == [s["tokens"] for s in want["segments"]]
        assert written["text"] == want["text"]
    assert not (out / "broken.json").exists()


def test_cli_batch_size_refuses_what_it_cannot_do(tiny_model_dir, short_speech, tmp_path):
    from conftest import run_tool

    for extra in (["--word-timestamps", "True"], ["--condition-on-previous-text", "True"],
                  ["--clip-timestamps", "1,5"]):
        result = run_tool("runtime", "transcribe", str(short_speech), "--model", str(tiny_model_dir),
                          "--batch-size", "2", "-o", str(tmp_path / "out"), *extra, check=False)
        assert result.returncode == 1, extra
        assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "--batch-size" in result.stderr
        assert not (tmp_path / "out").exists()
