"""The benchmark's arithmetic and its token gate (bench/stats.py, bench/cli.py), on crafted inputs:
no timings, no subprocesses."""

import pytest

from bench import stats
from bench.cli import decode_options, gate, summarize, table


def test_find_divergence_identical():
    assert stats.find_divergence([[1, 2, 3], [4]], [[1, 2, 3], [4]]) is None
    assert stats.describe_divergence(None) == "identical"


def test_find_divergence_reports_window_index_and_both_ids():
    d = stats.find_divergence([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 6]])
    assert d == {"window": 1, "index": 1, "reference": 5, "other": 9}
    assert "window 1, token 1" in stats.describe_divergence(d)


def test_find_divergence_lengths_and_missing_windows():
    assert stats.find_divergence([[1, 2]], [[1, 2, 3]]) == {"window": 0, "index": 2, "reference": None, "other": 3}
    assert stats.find_divergence([[1, 2, 3]], [[1, 2]]) == {"window": 0, "index": 2, "reference": 3, "other": None}
    assert stats.find_divergence([[1], [2]], [[1]]) == {"window": 1, "index": 0, "reference": 2, "other": None}
    assert stats.find_divergence([[1]], [[1], []])["window"] == 1


def test_tokens_by_window_groups_by_seek_and_drops_special_tokens():
    eot = 50257
    segments = [{"seek": 0, "tokens": [50364, 10, 11, 50400]}, {"seek": 0, "tokens": [50400, 12, 50500]},
                {"seek": 2900, "tokens": [13, eot]}]
    assert stats.tokens_by_window(segments, eot) == [[10, 11, 12], [13]]
    assert stats.text_tokens([eot - 1, eot, eot + 1], eot) == [eot - 1]


def test_median_spread_and_paired_ratios():
    assert stats.median([3.0, 1.0, 2.0]) == 2.0
    assert stats.median([4.0, 1.0, None, 2.0, 3.0]) == 2.5
    assert stats.median([]) is None
    assert stats.spread([2.0, None, 6.0, 4.0]) == {"median": 4.0, "min": 2.0, "max": 6.0, "n": 3}
    assert stats.spread([None]) is None
    # paired per repetition: only repetitions both sides have; the median of the ratios,
    # not the ratio of the medians (here 2.0 against 20 / 9)
    peer = {1: 20.0, 2: 30.0, 3: 10.0, 4: 99.0}
    base = {1: 10.0, 2: 10.0, 3: 5.0, 5: 1.0}
    assert stats.paired_ratios(peer, base) == pytest.approx([2.0, 3.0, 2.0])
    assert stats.ratio_summary(peer, base) == pytest.approx({"median": 2.0, "min": 2.0, "max": 3.0, "n": 3})
    assert stats.ratio_summary({1: 1.0}, {2: 1.0}) is None
    assert stats.per_token_ms(2.2, 220) == pytest.approx(10.0)
    assert stats.per_token_ms(1.0, 0) is None


def _run(impl, rep, wall, tokens, ok=True):
    return {"impl": impl, "rep": rep, "ok": ok, "wall_s": wall, "decode_s": wall / 2, "n_tokens": 220,
            "n_windows": len(tokens), "encode_s_per_window": [0.1] * len(tokens), "maxrss_mb": 500.0,
            "cold_start_s": 2.0, "load_s": 1.0, "tokens_by_window": tokens}


def test_gate_marks_invalid_and_summary_ratios():
    good, bad = [[1, 2, 3]], [[1, 7, 3]]
    runs = [_run("max", 1, 10.0, good), _run("openai", 1, 30.0, good), _run("faster-whisper", 1, 15.0, bad),
            _run("max", 2, 12.0, good), _run("openai", 2, 24.0, good), _run("faster-whisper", 2, 12.0, good)]
    g = gate(runs)
    assert g["max"]["status"] == "valid" and g["openai"]["status"] == "valid"
    assert g["faster-whisper"]["status"] == "INVALID"
    assert g["faster-whisper"]["divergences"] == [{"rep": 1, "window": 0, "index": 1, "reference": 2, "other": 7}]
    s = summarize(runs, duration=30.0)
    assert s["openai"]["wall_ratio_vs_max"] == pytest.approx({"median": 2.5, "min": 2.0, "max": 3.0, "n": 2})
    assert s["faster-whisper"]["wall_ratio_vs_max"]["median"] == pytest.approx(1.25)
    assert s["max"]["wall_s"] == {"median": 11.0, "min": 10.0, "max": 12.0, "n": 2}
    assert s["max"]["audio_s_per_s"]["median"] == pytest.approx((3.0 + 2.5) / 2)
    assert s["max"]["ms_per_token"]["median"] == pytest.approx(1000 * 5.5 / 220)
    text = table(s, g)
    assert "INVALID" in text and "1.00 (ref)" in text and "2.50 (2.00–3.00)" in text


def test_gate_without_reference_or_with_failures():
    runs = [_run("max", 1, 10.0, [[1]]), _run("openai", 1, 30.0, [[1]], ok=False)]
    assert gate(runs)["max"]["status"] == "unchecked"
    s = summarize(runs, duration=30.0)
    assert s["openai"]["failed"] == 1 and s["openai"]["wall_s"] is None and s["openai"]["wall_ratio_vs_max"] is None


def test_decode_options_match_across_implementations():
    o = decode_options("openai", timestamps=False, sample_len=220)
    assert o == {"language": "en", "without_timestamps": True, "condition_on_previous_text": False,
                 "temperature": 0.0, "sample_len": 220, "verbose": None, "fp16": False}
    f = decode_options("faster-whisper", timestamps=False, sample_len=220)
    assert f["max_new_tokens"] == 436 and f["beam_size"] == 1 and "sample_len" not in f
    assert decode_options("faster-whisper", timestamps=True, sample_len=220)["without_timestamps"] is False
    m = decode_options("max", timestamps=True, sample_len=220)
    assert m["without_timestamps"] is False and "fp16" not in m
