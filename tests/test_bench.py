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


# --- the real-use workloads (bench/real.py) and the command line ----------------------------------

from bench import real  # noqa: E402
from bench.cli import parse_args  # noqa: E402


def test_parse_args_scopes_models_workloads_impls_and_keeps_serving():
    a = parse_args([])
    assert (a.models, a.workloads, a.audio, a.repeats) == ("tiny.en,base", "api,cli,batch", None, 3)
    assert a.impls == "max,max-int8,openai,faster-whisper,faster-whisper-int8" and a.batch_size == 8 and not a.serving
    a = parse_args(["--models", "tiny.en", "--workloads", "cli,random", "--impls", "max,faster-whisper-int8",
                    "--audio", "jfk,long", "--synth-seconds", "40", "--repeats", "1", "--batch-files", "2",
                    "--batch-vad", "--serving"])
    assert (a.models, a.workloads, a.impls, a.audio, a.synth_seconds, a.repeats, a.batch_files) == \
        ("tiny.en", "cli,random", "max,faster-whisper-int8", "jfk,long", 40.0, 1, 2)
    assert a.batch_vad and a.serving


def test_main_refuses_unknown_workloads_and_implementations(tmp_path):
    from bench.cli import main

    with pytest.raises(SystemExit, match="unknown workload"):
        main(["--workloads", "api,nope", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown implementation"):
        main(["--impls", "max,whisper.cpp", "--out-dir", str(tmp_path)])


def test_workload_options_spell_the_same_settings():
    # whisper.transcribe()'s defaults: greedy; faster-whisper's own default is beam 5, so greedy is asked for
    assert real.workload_options("api", "openai") == {"verbose": None, "fp16": False}
    assert real.workload_options("api", "max") == {"verbose": None}
    assert real.workload_options("api", "faster-whisper-int8") == {"beam_size": 1, "best_of": 5}
    for impl in ("max", "openai", "faster-whisper"):
        o = real.workload_options("cli", impl)
        assert (o["beam_size"], o["best_of"]) == (5, 5) and "without_timestamps" not in o
    b = real.workload_options("batch", "max-batched")
    assert b == {"beam_size": 5, "best_of": 5, "without_timestamps": True, "condition_on_previous_text": False}
    assert real.workload_options("batch", "openai") == {**b, "verbose": None, "fp16": False}
    assert real.workload_options("batch", "max-batched", batch_vad=True)["vad_filter"] is True
    assert real.workload_options("batch", "faster-whisper-batched") == \
        {"beam_size": 5, "best_of": 5, "without_timestamps": True}
    with pytest.raises(ValueError):
        real.workload_options("random", "max")
    assert real.workload_impls("batch", ["max", "openai", "faster-whisper", "faster-whisper-int8"]) == \
        ["max-batched", "openai", "faster-whisper-batched", "faster-whisper-int8-batched"]
    assert real.workload_impls("api", ["openai", "faster-whisper-int8", "max"]) == \
        ["openai", "faster-whisper-int8", "max"]
    assert real.workload_impls("batch", ["max", "max-int8"]) == ["max-batched", "max-int8-batched"]
    assert "max-int8" not in real.EXACT and "max-int8-batched" not in real.EXACT  # reported, not gated
    from bench.driver import IMPLS

    every = ["max", "max-int8", "openai", *real.FW_IMPLS]
    for workload in real.WORKLOADS:  # the driver runs every implementation the workloads name
        assert set(real.workload_impls(workload, every)) <= set(IMPLS), workload


def test_impl_spec_same_weights_for_everyone(tmp_path):
    import argparse

    m = real.Model("tiny.en", tmp_path / "ct2", tmp_path / "art", tmp_path / "tiny.en.pt")
    audio = real.Audio("long", tmp_path / "a.wav", 40.0, "hello")
    args = argparse.Namespace(batch_files=3, batch_size=8)
    assert real.impl_spec("max", m, "api", audio, args) == {"audios": [str(audio.path)], "model": str(m.artifacts)}
    assert real.impl_spec("max-batched", m, "batch", audio, args)["decode_batch_size"] == 8
    assert real.impl_spec("max-int8", m, "api", audio, args) == {"audios": [str(audio.path)], "model": str(m.artifacts),
                                                                 "compute_type": "int8"}
    assert real.impl_spec("openai", m, "batch", audio, args) == {"audios": [str(audio.path)] * 3,
                                                                 "model": str(m.checkpoint)}
    fw = real.impl_spec("faster-whisper-int8-batched", m, "batch", audio, args)
    assert fw["model"] == str(m.ct2) and fw["compute_type"] == "int8" and fw["fw_batched"]
    assert real.impl_spec("faster-whisper", m, "cli", audio, args)["compute_type"] == "float32"


def test_first_sampled_window_and_temperatures_by_window():
    segs = [{"seek": 0, "temperature": 0.0}, {"seek": 0, "temperature": 0.0}, {"seek": 3000, "temperature": 0.4},
            {"seek": 5000}]
    assert stats.temperatures_by_window(segs) == [0.0, 0.4, 0.0]
    assert stats.first_sampled_window([0.0, 0.0, 0.2], [0.0, 0.6]) == 1
    assert stats.first_sampled_window([0.0], [0.0, 0.0]) is None


def _real_run(impl, rep, wall, tokens, temps=None, text="ask not", ok=True, n_audio=1):
    return {"impl": impl, "rep": rep, "ok": ok, "wall_s": wall, "tokens_by_window": tokens, "n_audio": n_audio,
            "temperatures_by_window": temps or [0.0] * len(tokens), "text": text, "maxrss_mb": 400.0,
            "cold_start_s": 1.5, "load_s": 0.3}


def test_real_gate_stops_at_sampled_windows_and_gates_only_this_project():
    ref = [[1, 2], [3, 4], [5]]
    runs = [_real_run("max", 1, 2.0, [[1, 2], [3, 4], [9]], temps=[0.0, 0.0, 0.2]),
            _real_run("openai", 1, 6.0, ref, temps=[0.0, 0.0, 0.2]),
            _real_run("faster-whisper", 1, 3.0, [[1, 2], [3, 7], [5]]),
            _real_run("faster-whisper-int8", 1, 2.5, ref)]
    g = real.gate(runs)
    # window 2 was sampled (temperature 0.2): compared up to it, so the last window's difference is allowed
    assert g["max"]["status"] == "identical" and g["max"]["compared_windows"] == 2
    assert real.gate_cell(g["max"]) == "identical (2 of 3 windows)"
    assert g["openai"]["status"] == "reference"
    assert g["faster-whisper"]["status"] == "differs"  # not gated: compared by WER
    assert g["faster-whisper"]["divergences"][0]["window"] == 1
    assert real.gate_cell(g["faster-whisper-int8"]) == "identical (2 of 3 windows)"  # openai sampled window 2
    bad = [_real_run("max", 1, 2.0, [[1, 8], [3, 4], [5]]), _real_run("openai", 1, 6.0, ref)]
    g = real.gate(bad)
    assert g["max"]["status"] == "INVALID" and real.any_invalid([{"gate": g}])
    assert real.gate(bad, unchecked={"max": "VAD"})["max"] == {"status": "unchecked", "reason": "VAD"}
    assert real.gate([_real_run("max", 1, 2.0, ref)])["max"]["status"] == "unchecked"


def test_real_wer_summary_and_table():
    audio = real.Audio("jfk", None, 11.0, "And so my fellow Americans, ask not")
    runs = [_real_run("max-batched", 1, 2.0, [[1]], text="and so my fellow americans ask not\nAnd so my fellow "
                      "Americans, ask not.", n_audio=2),
            _real_run("openai", 1, 8.0, [[1]], text="And so my fellow Americans, ask not. And so my fellow "
                      "Americans, ask not.", n_audio=2),
            _real_run("faster-whisper-batched", 1, 3.0, [[2]], text="And so my fellow Americans ask nothing. "
                      "And so my fellow Americans, ask not.", n_audio=2),
            _real_run("max-batched", 2, 4.0, [[1]], text="x", ok=False)]
    real.add_wer(runs, audio)
    assert runs[0]["wer"] == 0.0 and runs[1]["wer_vs_openai"] == 0.0
    assert runs[2]["wer"] == pytest.approx(1 / 14) and runs[2]["wer_vs_openai"] == pytest.approx(1 / 14)
    s = real.summarize(runs, duration=11.0)
    assert s["max-batched"]["runs"] == 1 and s["max-batched"]["failed"] == 1
    assert s["max-batched"]["audio_s_per_s"]["median"] == pytest.approx(11.0)  # two files in 2 s
    assert s["openai"]["wall_ratio_vs_max"]["median"] == pytest.approx(4.0)
    assert s["faster-whisper-batched"]["wer"] == pytest.approx(1 / 14)
    block = {"model": "tiny.en", "audio": "jfk", "audio_s": 11.0, "workload": "batch", "files": 2, "batch_size": 8,
             "summary": s, "gate": real.gate(runs)}
    text = real.markdown([block])
    assert "tiny.en, jfk (11 s): many files at once (2 files, batch size 8)" in text
    assert "| this project, transcribe_batch [1 run, 1 failed] | identical (1 window) | 2.00 |" in text
    assert "1.00 (ref)" in text and "| 7.1 | 7.1 |" in text and "differ from window 0 (not gated)" in text
