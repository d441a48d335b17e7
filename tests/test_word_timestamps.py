"""Word timestamps against openai-whisper: the numpy DTW and median filter, the alignment graph,
add_word_timestamps on a rich text, transcribe with word_timestamps (and with
hallucination_silence_threshold), and the CLI's subtitle options.

Word times are compared exactly (after openai-whisper's rounding to 0.01 s): they come from a DTW
path, which only a near-tie in its costs could move. Probabilities agree within 1e-4 (MAX and
torch logits differ by about 1e-6). Per-window tokens are checked with test_transcribe_parity's
near-tie reporting.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from audio_samples import synthesize_speech
from conftest import run_tool
from test_transcribe_parity import TIE_EPSILON, assert_same_segments, first_divergence, record_ours, \
    record_reference

from runtime import timing

PROBABILITY_TOLERANCE = 1e-4
LOGIT_TOLERANCE = 1e-4  # as tests/test_graph_parity.py


# ---------------------------------------------------------------------------- numpy kernels


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (3, 7), (40, 300), (120, 1500)])
def test_dtw_matches_openai_whisper(shape):
    from whisper.timing import dtw_cpu

    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape)
    assert np.array_equal(np.stack(timing.dtw(x)), dtw_cpu(x))


def test_dtw_breaks_ties_as_openai_whisper():
    """Small integer costs tie often: the preferred step on a tie must be openai's."""
    from whisper.timing import dtw_cpu

    rng = np.random.default_rng(1)
    for _ in range(300):
        x = rng.integers(0, 3, size=(rng.integers(1, 12), rng.integers(1, 30))).astype(np.float64)
        assert np.array_equal(np.stack(timing.dtw(x)), dtw_cpu(x)), x


@pytest.mark.parametrize("shape,width", [((12, 40, 300), 7), ((5, 50), 7), ((50,), 3), ((3,), 7), ((2, 3), 7),
                                         ((4, 6, 20), 1)])
def test_median_filter_matches_openai_whisper(shape, width):
    from whisper.timing import median_filter

    rng = np.random.default_rng(len(shape) * 10 + width)
    x = rng.standard_normal(shape).astype(np.float32)
    if x.size > 10:
        x.flat[5] = np.nan  # std 0 makes NaN in find_alignment; torch's sort puts it last
    ours = timing.median_filter(x, width)
    theirs = median_filter(torch.from_numpy(x), width).numpy()
    assert ours.shape == theirs.shape
    assert np.array_equal(ours, theirs, equal_nan=True)


def test_alignment_heads_follow_openai_whisper():
    """No table entry (the random checkpoint): the last half of the layers, all heads, as
    whisper/model.py; a table entry (official tiny): the converter's pairs, in the mask's order."""
    import whisper
    from whisper.model import ModelDimensions, Whisper

    from checkpoints import TINY_DIMS
    from converter.official import alignment_heads

    model = Whisper(ModelDimensions(**TINY_DIMS))
    dims = SimpleNamespace(**TINY_DIMS)
    default = timing.alignment_heads_of(SimpleNamespace(dims=dims, alignment_heads=None))
    assert default == [tuple(pair) for pair in model.alignment_heads.indices().T.tolist()]
    assert len(default) == 2 * 6

    model.set_alignment_heads(whisper._ALIGNMENT_HEADS["tiny"])
    official = alignment_heads("tiny", TINY_DIMS)
    ours = timing.alignment_heads_of(SimpleNamespace(dims=dims, alignment_heads=official[::-1]))
    assert ours == [tuple(pair) for pair in model.alignment_heads.indices().T.tolist()]


# ---------------------------------------------------------------------------- the alignment graph


@pytest.fixture(scope="module")
def speech_mel(speech_72s):
    import whisper

    audio = whisper.load_audio(str(speech_72s))
    return whisper.log_mel_spectrogram(audio, padding=whisper.audio.N_SAMPLES)


def test_alignment_graph_matches_torch(tiny_runtime, torch_tiny, speech_mel):
    import whisper
    from torch_inference import TorchInference

    window = whisper.pad_or_trim(speech_mel[:, 500:], 3000).numpy()[None]
    tokens = np.array([50258, 50259, 50359, 50363, 440, 1000, 7, 2000, 300, 11, 50257])
    heads = [(3, 1), (0, 0), (2, 5), (3, 1)]  # any order, repeats allowed: row i is heads[i]
    logits, scores = tiny_runtime.cross_attention_scores(tiny_runtime.encode(window), tokens, heads)
    reference = TorchInference(torch_tiny)
    ref_logits, ref_scores = reference.cross_attention_scores(reference.encode(window), tokens, heads)
    assert logits.shape == ref_logits.shape == (len(tokens), 51865)
    assert scores.shape == ref_scores.shape == (len(heads), len(tokens), 1500)
    assert np.abs(logits - ref_logits).max() < LOGIT_TOLERANCE
    assert np.abs(scores - ref_scores).max() < LOGIT_TOLERANCE
    assert np.array_equal(scores[0], scores[3])


# ---------------------------------------------------------------------------- add_word_timestamps

TEXTS = {
    "en": [' Hello, world. This is (a) test of the "word" timestamps!',
           " Is it... well? Yes: \u00bfno? It's 42 o'clock, right?", " Last one."],
    # no spaces between words: split where the tokens decode to whole characters
    "ja": ["こんにちは、世界。", "これは「テスト」です！", "はい？"],
}


def segments_for(tokenizer, language: str, seek: int) -> list[dict]:
    """Three segments of known text in one window, each between two timestamp tokens."""
    segments = []
    for i, text in enumerate(TEXTS[language]):
        start, end = 3.0 * i + 0.4, 3.0 * i + 2.8
        tokens = [tokenizer.timestamp_begin + round(start / 0.02), *tokenizer.encode(text),
                  tokenizer.timestamp_begin + round(end / 0.02)]
        segments.append(dict(seek=seek, start=seek / 100 + start, end=seek / 100 + end, tokens=tokens))
    return segments


def assert_same_words(ours: list[dict], theirs: list[dict]) -> int:
    """Same segment bounds and words, exact times, close probabilities; returns the words compared."""
    assert len(ours) == len(theirs)
    compared = 0
    for index, (our_segment, ref_segment) in enumerate(zip(ours, theirs)):
        where = f"segment {index}"
        assert (our_segment["start"], our_segment["end"]) == (ref_segment["start"], ref_segment["end"]), where
        assert [w["word"] for w in our_segment["words"]] == [w["word"] for w in ref_segment["words"]], where
        for our_word, ref_word in zip(our_segment["words"], ref_segment["words"]):
            assert (our_word["start"], our_word["end"]) == (ref_word["start"], ref_word["end"]), \
                f"{where}, word {ref_word['word']!r}: ours {our_word}, openai-whisper {ref_word}"
            assert our_word["probability"] == pytest.approx(ref_word["probability"], abs=PROBABILITY_TOLERANCE)
            compared += 1
    return compared


@pytest.mark.parametrize("language,seek,num_frames", [("en", 0, 3000), ("en", 1500, 1234), ("ja", 700, 2500),
                                                      ("en", 100, 2)])
def test_add_word_timestamps_matches_openai_whisper(language, seek, num_frames, tiny_runtime, torch_tiny,
                                                     speech_mel):
    """Several segments with punctuation to merge, in one window, a partial window (the alignment
    sees only its real frames) and a one-frame window; openai's heuristics for long words apply."""
    import whisper
    import whisper.timing
    from whisper.tokenizer import get_tokenizer as openai_tokenizer

    from runtime.tokenizer import get_tokenizer

    their_tokenizer = openai_tokenizer(True, num_languages=99, language=language, task="transcribe")
    our_tokenizer = get_tokenizer(tiny_runtime.tokenizer_path, True, language=language, task="transcribe")
    window = whisper.pad_or_trim(speech_mel[:, seek: seek + num_frames], 3000)

    theirs = segments_for(their_tokenizer, language, seek)
    whisper.timing.add_word_timestamps(segments=theirs, model=torch_tiny, tokenizer=their_tokenizer, mel=window,
                                       num_frames=num_frames, last_speech_timestamp=0.0)
    ours = segments_for(our_tokenizer, language, seek)
    timing.add_word_timestamps(segments=ours, model=tiny_runtime, tokenizer=our_tokenizer,
                               audio_features=tiny_runtime.encode(window.numpy()[None]), num_frames=num_frames,
                               last_speech_timestamp=0.0)
    compared = assert_same_words(ours, theirs)
    assert compared >= 6
    print(f"\n{language} seek {seek} frames {num_frames}: {compared} words identical "
          f"({len({w['start'] for s in theirs for w in s['words']})} distinct start times)")


# ---------------------------------------------------------------------------- transcribe

CASES = {
    "words": dict(seconds=None),
    # the random model's words are improbable, so every segment looks like a hallucination: the
    # silence-skipping seeks run in every window (about 40 s keeps the test short)
    "hallucination-silence": dict(seconds=40, hallucination_silence_threshold=15.0),
    # with some words made probable (the same ones on both sides), some segments are kept
    "hallucination-silence-confident-words": dict(seconds=72, hallucination_silence_threshold=8.0,
                                                  confident_words=True),
}


def confident_words(find_alignment):
    """find_alignment, with the words that start on two of every three 20 ms steps made probable:
    the random model's words are all improbable, which leaves the hallucination rules one path."""

    def wrapped(*args, **kwargs):
        alignment = find_alignment(*args, **kwargs)
        for word in alignment:
            if int(round(word.start * 50)) % 3:
                word.probability = 0.9
        return alignment

    return wrapped


@pytest.mark.parametrize("case", list(CASES))
def test_transcribe_word_timestamps_match_openai_whisper(case, monkeypatch, tiny_runtime, torch_tiny, speech_72s):
    import whisper

    import runtime

    import whisper.timing

    options = dict(CASES[case])
    seconds = options.pop("seconds")
    if options.pop("confident_words", False):
        monkeypatch.setattr(whisper.timing, "find_alignment", confident_words(whisper.timing.find_alignment))
        monkeypatch.setattr(timing, "find_alignment", confident_words(timing.find_alignment))
    audio = whisper.load_audio(str(speech_72s))
    if seconds is not None:
        audio = audio[: seconds * 16000]
    options.update(language="en", temperature=0.0, word_timestamps=True, verbose=None)

    reference_calls = record_reference(monkeypatch)
    reference = whisper.transcribe(torch_tiny, audio, fp16=False, **copy.deepcopy(options))
    our_calls, _ = record_ours(monkeypatch)
    ours = runtime.transcribe(tiny_runtime, audio, **options)

    tie = first_divergence(reference_calls, our_calls)
    if tie is not None:
        print(f"\n{case}: near-tie at window {tie.window}, token {tie.index}: openai-whisper's top-2 logits "
              f"differ by {tie.margin:.2e} < {TIE_EPSILON}; it chose {tie.reference_token}, we chose {tie.our_token}")
        return
    assert ours["text"] == reference["text"]
    assert_same_segments(ours, reference)
    compared = assert_same_words(ours["segments"], reference["segments"])
    print(f"\n{case}: {len(reference_calls)} windows, {sum(len(c.tokens) for c in reference_calls)} tokens, "
          f"{len(ours['segments'])} segments, {compared} words identical")
    assert len(reference_calls) >= 3
    if case == "words":
        assert compared > 0 and all("words" in s for s in ours["segments"])
    elif case == "hallucination-silence-confident-words":
        assert compared > 0
    else:
        # the threshold acted: without it, the loop decodes other windows
        plain_calls, _ = record_ours(monkeypatch)
        runtime.transcribe(tiny_runtime, audio, **{**options, "hallucination_silence_threshold": None})
        assert [c.tokens for c in plain_calls] != [c.tokens for c in our_calls]


# ---------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def short_speech(tmp_path_factory):
    return synthesize_speech(tmp_path_factory.mktemp("short-words") / "words.wav", n_sentences=3)


DECODE = ["--language", "en", "--temperature-increment-on-fallback", "none", "--verbose", "False",
          "--beam-size", "none"]


def test_cli_subtitles_with_words_equal_openai_whispers_writers(tiny_model_dir, short_speech, tmp_path):
    from whisper.utils import get_writer

    out = tmp_path / "ours"
    result = run_tool("runtime", "transcribe", str(short_speech), "--model", str(tiny_model_dir), "--output-dir",
                      str(out), *DECODE, "--word-timestamps", "--highlight-words", "True", "--max-line-width", "20",
                      "--max-words-per-line", "3", "--output-format", "all")
    assert "--max-words-per-line has no effect with --max-line-width" in result.stderr
    our_result = json.loads((out / "words.json").read_text())
    words = [w for s in our_result["segments"] for w in s["words"]]
    assert words and all(set(w) == {"word", "start", "end", "probability"} for w in words)

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    options = {"highlight_words": True, "max_line_width": 20, "max_line_count": None, "max_words_per_line": 3}
    get_writer("all", str(theirs))(our_result, str(short_speech), options)
    for name in ("words.srt", "words.vtt", "words.txt", "words.tsv", "words.json"):
        assert (out / name).read_bytes() == (theirs / name).read_bytes(), name
    assert "<u>" in (out / "words.srt").read_text()


@pytest.mark.parametrize("option", [["--highlight-words"], ["--max-line-width", "30"], ["--max-line-count", "2"],
                                    ["--max-words-per-line", "4"]])
def test_cli_subtitle_options_require_word_timestamps(option, tiny_model_dir, short_speech, tmp_path):
    out = tmp_path / "out"
    result = run_tool("runtime", "transcribe", str(short_speech), "--model", str(tiny_model_dir), "--output-dir",
                      str(out), *DECODE, *option, check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0] == f"error: {option[0]} requires --word-timestamps"
    assert not out.exists()
