"""runtime.writers writes the same bytes as openai-whisper's writers (the reference, tests only)."""

from __future__ import annotations

import copy
import os
import random
import stat
from pathlib import Path

import pytest

from runtime import writers
from runtime.writers import format_timestamp, get_writer

whisper_utils = pytest.importorskip("whisper.utils")

FORMATS = ["txt", "vtt", "srt", "tsv", "json"]


def _segment(i, seek, start, end, text, tokens=None, words=None):
    segment = {
        "id": i,
        "seek": seek,
        "start": start,
        "end": end,
        "text": text,
        "tokens": tokens if tokens is not None else [50364 + i, 440, 1702, 50414 + i],
        "temperature": 0.0 if i % 3 else 0.2,
        "avg_logprob": -0.2345678901234 - i / 7,
        "compression_ratio": 1.3456789 + i / 11,
        "no_speech_prob": 0.0123456789 * (i + 1),
    }
    if words is not None:
        segment["words"] = words
    return segment


def realistic_result() -> dict:
    segments = [
        _segment(0, 0, 0.0, 4.28, " The quick brown fox jumps over the lazy dog."),
        _segment(1, 0, 4.28, 9.5, " Grüße aus Köln — 日本語のテキスト, émoji 🎉 and ñ."),
        _segment(2, 0, 9.5, 9.5, " "),  # zero-length, blank
        _segment(3, 3000, 30.0, 33.3333, "  Leading and trailing spaces  "),
        _segment(4, 3000, 33.3333, 37.0625, " An arrow --> inside, pipes | and || here, a\ttab."),
        _segment(5, 6000, 59.9995, 60.0005, " Rounding at the minute."),
        _segment(6, 360000, 3599.9996, 3600.0004, " Around one hour."),
        _segment(7, 361000, 3723.456, 3730.0, " Past one hour: 'quotes' \"double\" \\ backslash."),
        _segment(8, 361500, 7384.5, 7384.5, " Zero-length past two hours"),
        _segment(9, 362000, 7390.0625, 7391.0, "<b>not html</b> & stuff\n with a newline"),
    ]
    return {"text": "".join(s["text"] for s in segments), "segments": segments, "language": "en"}


def _words(pieces, start, gap=0.0):
    """Word timings for `pieces` (words with their leading spaces), 0.3 s each plus `gap` between."""
    out = []
    t = start
    for piece in pieces:
        out.append({"word": piece, "start": round(t, 3), "end": round(t + 0.3, 3), "probability": 0.9})
        t += 0.3 + gap
    return out


def result_with_words() -> dict:
    w0 = _words([" Hello", " there,", " how", " are", " you", " doing", " today?"], 0.5)
    w1 = _words([" I", " am", " fine,", " thanks", " for", " asking", " about", " it."], 3.0, gap=0.1)
    w2 = _words([" Après", " une", " longue", " pause", " --> ", " ça", " continue."], 12.0, gap=0.05)
    w3 = _words([" Supercalifragilisticexpialidocious", " word", " here."], 3661.0)
    segments = [
        _segment(0, 0, 0.5, w0[-1]["end"], "".join(w["word"] for w in w0), words=w0),
        _segment(1, 0, 3.0, w1[-1]["end"], "".join(w["word"] for w in w1), words=w1),
        _segment(2, 1000, 12.0, w2[-1]["end"], "".join(w["word"] for w in w2), words=w2),
        _segment(3, 366000, 3661.0, w3[-1]["end"], "".join(w["word"] for w in w3), words=w3),
    ]
    return {"text": "".join(s["text"] for s in segments), "segments": segments, "language": "en"}


def random_result_with_words(seed: int) -> dict:
    rng = random.Random(seed)
    vocabulary = ["a", "the", "quick", "brown", "fox", "jumps", "über", "日本", "niño", "--> ", "|", "ok.",
                  "extraordinarily", "x", "words,", "and", "so", "on"]
    t = rng.uniform(0, 2)
    segments = []
    for i in range(rng.randint(1, 6)):
        words = []
        for _ in range(rng.randint(0 if i else 1, 12)):
            t += rng.choice([0.0, 0.1, 0.5, 1.0, 3.5]) if rng.random() < 0.3 else 0.0
            duration = rng.choice([0.0, 0.12, 0.3, 0.75, 2.6])  # a long word then a 1 s gap: pause from start
            words.append({"word": rng.choice(["", " ", "  "]) + rng.choice(vocabulary),
                          "start": round(t, 2), "end": round(t + duration, 2), "probability": rng.random()})
            t += duration
        start = words[0]["start"] if words else t
        end = words[-1]["end"] if words else t
        segments.append(_segment(i, 0, start, end, "".join(w["word"] for w in words), words=words))
    return {"text": "".join(s["text"] for s in segments), "segments": segments, "language": "en"}


def _write_with_whisper(output_format, result, out_dir: Path, audio_path="speech.wav", options=None, **kwargs):
    out_dir.mkdir(parents=True, exist_ok=True)
    whisper_utils.get_writer(output_format, str(out_dir))(copy.deepcopy(result), audio_path, options, **kwargs)


def _write_with_runtime(output_format, result, out_dir: Path, audio_path="speech.wav", options=None, **kwargs):
    out_dir.mkdir(parents=True, exist_ok=True)
    before = copy.deepcopy(result)
    get_writer(output_format, str(out_dir))(result, audio_path, options, **kwargs)
    assert result == before  # the result dict is not modified


def _files(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _assert_same_as_whisper(tmp_path, output_format, result, options=None, audio_path="speech.wav", **kwargs):
    ref_dir, our_dir = tmp_path / "whisper", tmp_path / "runtime"
    _write_with_whisper(output_format, result, ref_dir, audio_path, options, **kwargs)
    _write_with_runtime(output_format, result, our_dir, audio_path, options, **kwargs)
    expected, ours = _files(ref_dir), _files(our_dir)
    assert list(ours) == list(expected)  # same names, and no temporary files left behind
    for name in expected:
        assert ours[name] == expected[name], name
    return ours


# --- format_timestamp --------------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [0, 0.0004, 0.0005, 0.0015, 0.0625, 1.5, 59.9995, 60.0, 61.001, 599.99949,
                                     3599.9995, 3600.0, 3723.456, 36000.0, 360000.5, 12.345678])
@pytest.mark.parametrize("hours,marker", [(False, "."), (True, ","), (True, ".")])
def test_format_timestamp_equals_whisper(seconds, hours, marker):
    assert format_timestamp(seconds, hours, marker) == whisper_utils.format_timestamp(seconds, hours, marker)


def test_format_timestamp_values():
    assert format_timestamp(0) == "00:00.000"
    assert format_timestamp(3723.456) == "01:02:03.456"
    assert format_timestamp(1.5, always_include_hours=True, decimal_marker=",") == "00:00:01,500"
    with pytest.raises(ValueError, match="non-negative"):
        format_timestamp(-0.5)
    with pytest.raises(ValueError, match="non-negative"):
        format_timestamp(float("nan"))


# --- the five formats --------------------------------------------------------------------------


@pytest.mark.parametrize("output_format", FORMATS)
def test_realistic_result_same_bytes(tmp_path, output_format):
    files = _assert_same_as_whisper(tmp_path, output_format, realistic_result())
    assert list(files) == [f"speech.{output_format}"]
    text = files[f"speech.{output_format}"].decode("utf-8")
    if output_format != "json":
        assert "日本語" in text and "Grüße" in text  # unicode written as UTF-8, not escaped
    if output_format in ("vtt", "srt"):
        assert "An arrow -> inside" in text  # "-->" in the text cannot break a cue line
    if output_format == "srt":
        assert "01:02:03,456 --> 01:02:10,000" in text


@pytest.mark.parametrize("output_format", FORMATS)
def test_empty_result_same_bytes(tmp_path, output_format):
    _assert_same_as_whisper(tmp_path, output_format, {"text": "", "segments": [], "language": "en"})


@pytest.mark.parametrize("output_format", FORMATS)
@pytest.mark.parametrize("options", [
    {"max_line_width": 20, "max_line_count": 2, "highlight_words": True, "max_words_per_line": 3},
    {"max_line_width": 10},
    {"highlight_words": True},
    {"max_line_width": None, "max_line_count": None, "highlight_words": False, "max_words_per_line": None},
])
def test_options_without_words_same_bytes(tmp_path, output_format, options):
    files = _assert_same_as_whisper(tmp_path, output_format, realistic_result(), options)
    # without word timings the options change nothing: same as writing with no options
    plain_dir = tmp_path / "plain"
    _write_with_runtime(output_format, realistic_result(), plain_dir)
    assert _files(plain_dir) == files


def test_all_writes_five_files(tmp_path):
    files = _assert_same_as_whisper(tmp_path, "all", realistic_result(), audio_path="/some/where/my.talk.mp3")
    assert sorted(files) == sorted(f"my.talk.{ext}" for ext in FORMATS)


def test_audio_path_stem_and_output_dir(tmp_path):
    out = tmp_path / "out"
    _write_with_runtime("txt", realistic_result(), out, audio_path=str(tmp_path / "dir.x" / "a.b.c.flac"))
    assert [p.name for p in out.iterdir()] == ["a.b.c.txt"]
    assert (out / "a.b.c.txt").read_text(encoding="utf-8").splitlines()[0] == "The quick brown fox jumps over the lazy dog."


def test_txt_and_tsv_content(tmp_path):
    _write_with_runtime("txt", realistic_result(), tmp_path)
    _write_with_runtime("tsv", realistic_result(), tmp_path)
    txt = (tmp_path / "speech.txt").read_text(encoding="utf-8").split("\n")
    assert txt[2] == "" and txt[3] == "Leading and trailing spaces"
    tsv = (tmp_path / "speech.tsv").read_text(encoding="utf-8").split("\n")
    assert tsv[0] == "start\tend\ttext"
    assert tsv[5] == "33333\t37062\tAn arrow --> inside, pipes | and || here, a tab."  # round half to even


# --- word-level subtitles ----------------------------------------------------------------------

WORD_OPTIONS = [
    None,
    {},
    {"highlight_words": True},
    {"max_line_width": 20},
    {"max_line_count": 2},
    {"max_line_width": 20, "max_line_count": 2},
    {"max_line_width": 12, "max_line_count": 1},
    {"max_line_width": 30, "max_line_count": 3, "highlight_words": True},
    {"max_words_per_line": 3},
    {"max_words_per_line": 2, "highlight_words": True},
    {"max_words_per_line": 4, "max_line_width": 15, "max_line_count": 2},
    {"max_line_width": 0, "max_line_count": 0, "max_words_per_line": 0},  # falsy values, as whisper reads them
]


@pytest.mark.parametrize("output_format", FORMATS)
@pytest.mark.parametrize("options", WORD_OPTIONS)
def test_words_same_bytes(tmp_path, output_format, options):
    _assert_same_as_whisper(tmp_path, output_format, result_with_words(), options)


def test_words_keyword_options_same_bytes(tmp_path):
    # options passed as keywords override the dict, as in whisper's writer(result, path, options, **kwargs)
    _assert_same_as_whisper(tmp_path, "all", result_with_words(), {"max_line_width": 50},
                            max_line_width=16, max_line_count=2, highlight_words=True)


@pytest.mark.parametrize("seed", range(40))
def test_random_words_same_bytes(tmp_path, seed):
    rng = random.Random(1000 + seed)
    options = {
        "max_line_width": rng.choice([None, 8, 16, 42]),
        "max_line_count": rng.choice([None, 1, 2, 3]),
        "highlight_words": rng.choice([False, True]),
        "max_words_per_line": rng.choice([None, 1, 2, 5]),
    }
    result = random_result_with_words(seed)
    for output_format in ("vtt", "srt"):
        _assert_same_as_whisper(tmp_path / output_format, output_format, result, options)


def test_words_content(tmp_path):
    _write_with_runtime("vtt", result_with_words(), tmp_path, options={"max_line_width": 20, "max_line_count": 2})
    vtt = (tmp_path / "speech.vtt").read_text(encoding="utf-8")
    assert vtt.startswith("WEBVTT\n\n00:00.500 --> ")
    cues = vtt.split("\n\n")[1:-1]
    for cue in cues:
        lines = cue.split("\n")[1:]
        assert 1 <= len(lines) <= 2
        assert all(len(line) <= 20 or " " not in line for line in lines)
    assert "01:01:01.000 --> " in vtt  # the hour is shown once it is non-zero
    _write_with_runtime("srt", result_with_words(), tmp_path / "hl", options={"highlight_words": True})
    srt = (tmp_path / "hl" / "speech.srt").read_text(encoding="utf-8")
    assert "<u>Hello</u> there," in srt and "Hello <u>there,</u>" in srt


# --- atomic writing and errors ----------------------------------------------------------------


def test_overwrite_and_permissions_like_whisper(tmp_path):
    ref_dir, our_dir = tmp_path / "whisper", tmp_path / "runtime"
    _write_with_whisper("srt", realistic_result(), ref_dir)
    (our_dir).mkdir()
    (our_dir / "speech.srt").write_text("old content that is longer than nothing" * 100)
    _write_with_runtime("srt", realistic_result(), our_dir)
    assert _files(our_dir) == _files(ref_dir)
    assert stat.S_IMODE((our_dir / "speech.srt").stat().st_mode) == stat.S_IMODE((ref_dir / "speech.srt").stat().st_mode)


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "speech.vtt"
    target.write_text("previous transcript\n", encoding="utf-8")
    broken = realistic_result()
    del broken["segments"][3]["text"]
    with pytest.raises(KeyError):
        get_writer("vtt", str(tmp_path))(broken, "speech.wav", None)
    bad_text = realistic_result()
    bad_text["segments"][0]["text"] = "lone surrogate \ud800"
    with pytest.raises(UnicodeEncodeError):
        get_writer("vtt", str(tmp_path))(bad_text, "speech.wav", None)
    assert os.listdir(tmp_path) == ["speech.vtt"]
    assert target.read_text(encoding="utf-8") == "previous transcript\n"


def test_unknown_format_and_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown output format 'docx'"):
        get_writer("docx", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="output directory does not exist"):
        get_writer("txt", str(tmp_path / "missing"))(realistic_result(), "a.wav", None)
    with pytest.raises(ValueError, match="segments"):
        get_writer("srt", str(tmp_path))({"text": "no segments"}, "a.wav", None)
    assert os.listdir(tmp_path) == []


def test_writers_module_does_not_import_whisper():
    source = Path(writers.__file__).read_text()
    assert "import whisper" not in source and "from whisper" not in source and "import torch" not in source
