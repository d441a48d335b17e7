"""The `runtime` command: output files, the no-torch rule, and clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from audio_samples import synthesize_speech
from conftest import run_tool

# greedy, as whisper.transcribe's Python default that these tests compare with (the CLI defaults to
# beam 5 like openai-whisper's CLI; tests/test_beam_parity.py covers that)
DECODE = ["--language", "en", "--temperature-increment-on-fallback", "none", "--verbose", "False",
          "--beam-size", "none"]


@pytest.fixture(scope="module")
def short_speech(tmp_path_factory):
    return synthesize_speech(tmp_path_factory.mktemp("short") / "short.wav", n_sentences=3)


def transcribe_cli(model_dir, audio, out_dir, *extra, check=True):
    return run_tool("runtime", "transcribe", *map(str, audio if isinstance(audio, list) else [audio]),
                    "--model", str(model_dir), "--output-dir", str(out_dir), *DECODE, *extra, check=check)


def assert_nothing_written(out_dir):
    assert not out_dir.exists() or not any(out_dir.iterdir()), sorted(out_dir.iterdir())


def assert_one_line_error(result, *needles):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_output_files_equal_openai_whispers_writers(tiny_model_dir, torch_tiny, short_speech, tmp_path):
    """Text formats hold text and timestamps only: byte-equal to openai-whisper's files for its own
    result. JSON also holds avg_logprob and friends, which MAX and torch agree on to about 1e-7, not
    bit for bit: our JSON is byte-equal to openai-whisper's writer on our result, and its values
    match openai-whisper's result."""
    import whisper
    from whisper.utils import get_writer

    writer_options = {"max_line_width": None, "max_line_count": None, "highlight_words": False}
    ours = tmp_path / "ours"
    transcribe_cli(tiny_model_dir, short_speech, ours, "--output-format", "all")
    reference = whisper.transcribe(torch_tiny, str(short_speech), fp16=False, temperature=0.0, language="en",
                                   verbose=None)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    get_writer("all", str(theirs))(reference, str(short_speech), writer_options)
    names = sorted(p.name for p in theirs.iterdir())
    assert names == ["short.json", "short.srt", "short.tsv", "short.txt", "short.vtt"]
    assert sorted(p.name for p in ours.iterdir()) == names
    for name in ("short.srt", "short.tsv", "short.txt", "short.vtt"):
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name

    our_result = json.loads((ours / "short.json").read_text())
    rewritten = tmp_path / "rewritten"
    rewritten.mkdir()
    get_writer("json", str(rewritten))(our_result, str(short_speech), writer_options)
    assert (rewritten / "short.json").read_bytes() == (ours / "short.json").read_bytes()
    assert our_result["text"] == reference["text"] and our_result["language"] == reference["language"]
    for our_segment, ref_segment in zip(our_result["segments"], reference["segments"], strict=True):
        for key, value in ref_segment.items():
            if isinstance(value, float):
                assert our_segment[key] == pytest.approx(value, abs=1e-4), key
            else:
                assert our_segment[key] == value, key


def test_runtime_never_imports_torch_or_whisper(tiny_model_dir, short_speech):
    code = (
        "import sys, runtime\n"
        f"model = runtime.load_model({str(tiny_model_dir)!r})\n"
        f"result = runtime.transcribe(model, {str(short_speech)!r}, language='en', temperature=0.0, verbose=None)\n"
        "assert result['segments'], result\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'whisper'))\n"
        "print(loaded)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_missing_audio_file(tiny_model_dir, tmp_path):
    result = transcribe_cli(tiny_model_dir, tmp_path / "nope.wav", tmp_path / "out", check=False)
    assert_one_line_error(result, "not found", "nope.wav")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("kind", ["empty", "garbage"])
def test_unreadable_audio(tiny_model_dir, tmp_path, kind):
    audio = tmp_path / f"{kind}.mp3"
    audio.write_bytes(b"" if kind == "empty" else b"\x00\x01 definitely not audio " * 64)
    result = transcribe_cli(tiny_model_dir, audio, tmp_path / "out", check=False)
    assert_one_line_error(result, str(audio.name))
    assert_nothing_written(tmp_path / "out")


def test_truncated_weights(isolated_copy, tiny_model_dir, short_speech, tmp_path):
    # the runtime reads the target's weights, made by make compile from the checkpoint's
    model = isolated_copy(tiny_model_dir)
    weights = model / "cpu" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = transcribe_cli(model, short_speech, tmp_path / "out", check=False)
    assert_one_line_error(result, "truncated", "make compile")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("shape,source,target", [((51865, 384), "float16", "float16"), ((1537, 130), "float16", "float32"),
                                                  ((63, 5), "float32", "float32"), ((1, 7), "float16", "float16")])
def test_blocked_transpose_is_numpys(shape, source, target):
    """The load's weight transposes, copied a block of rows at a time: numpy's values, bit for bit."""
    from graph_builders.weights import transform

    array = (np.random.default_rng(shape[0]).standard_normal(shape) * 3).astype(source)
    ours = transform(array, "transpose", target)
    expected = np.ascontiguousarray(array.T, dtype=target)
    assert ours.flags.c_contiguous and ours.dtype == expected.dtype and ours.shape == expected.shape
    assert ours.tobytes() == expected.tobytes()


@pytest.mark.parametrize("where", ["data", "header"])
def test_weights_checksum_mismatch(isolated_copy, tiny_model_dir, short_speech, tmp_path, where):
    model = isolated_copy(tiny_model_dir)
    weights = model / "cpu" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    # same size: one flipped byte inside a tensor, or a tensor's shape in the header made unreadable
    data[-1000 if where == "data" else 20] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = transcribe_cli(model, short_speech, tmp_path / "out", check=False)
    assert_one_line_error(result, "weights.safetensors", "make compile")
    assert_nothing_written(tmp_path / "out")


def test_checkpoint_weights_checked_when_the_target_weights_are_made(isolated_copy, tiny_model_dir):
    model = isolated_copy(tiny_model_dir)
    (model / "cpu" / "weights.safetensors").unlink()
    weights = model / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1000] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = run_tool("graph-builders", "compile", str(model), "--device", "cpu", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "does not match the sha256 model.json records" in result.stderr and "make convert" in result.stderr
    assert not (model / "cpu" / "weights.safetensors").exists()


@pytest.mark.parametrize("field,value,needle", [
    ("max_version", "0.0.1", "MAX 0.0.1"),
    ("device", "gpu", "built for gpu"),
])
def test_manifest_from_another_max_or_device(isolated_copy, tiny_model_dir, short_speech, tmp_path, field, value, needle):
    model = isolated_copy(tiny_model_dir)
    manifest_path = model / "cpu" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest[field] = value
    manifest_path.write_text(json.dumps(manifest))
    result = transcribe_cli(model, short_speech, tmp_path / "out", check=False)
    assert_one_line_error(result, needle, "make compile")
    assert_nothing_written(tmp_path / "out")


def test_corrupt_mef(isolated_copy, tiny_model_dir, short_speech, tmp_path):
    model = isolated_copy(tiny_model_dir)
    mef = model / "cpu" / "decoder_step.mef"
    mef.write_bytes(mef.read_bytes()[:1000])
    result = transcribe_cli(model, short_speech, tmp_path / "out", check=False)
    assert_one_line_error(result, "decoder_step.mef", "make compile")


def test_corrupt_alignment_graph_fails_word_timestamps_alone(isolated_copy, tiny_model_dir, short_speech, tmp_path):
    # the word-alignment graph is read on first use (runtime.engine.ON_FIRST_USE), and checked then
    model = isolated_copy(tiny_model_dir)
    mef = model / "cpu" / "decoder_alignment.mef"
    mef.write_bytes(mef.read_bytes()[:1000])
    transcribe_cli(model, short_speech, tmp_path / "plain")
    assert (tmp_path / "plain" / f"{short_speech.stem}.txt").is_file()
    # --verbose True prints segments to stdout, not a progress bar to stderr
    result = transcribe_cli(model, short_speech, tmp_path / "words", "--word-timestamps", "True", "--verbose", "True",
                            check=False)
    assert_one_line_error(result, "decoder_alignment.mef", "does not match the sha256", "make compile")


def test_not_compiled_says_which_make_compile(isolated_copy, tiny_model_dir, short_speech, tmp_path):
    import shutil

    model = isolated_copy(tiny_model_dir)
    shutil.rmtree(model / "cpu")
    result = transcribe_cli(model, short_speech, tmp_path / "out", check=False)
    assert_one_line_error(result, f"make compile NAME={model.name} DEVICE=cpu")


def test_gpu_requested_without_gpu(tiny_model_dir, short_speech, tmp_path):
    from max import driver

    if driver.accelerator_count() > 0:
        pytest.skip("a GPU is attached")
    result = transcribe_cli(tiny_model_dir, short_speech, tmp_path / "out", "--device", "gpu", check=False)
    assert_one_line_error(result, "no GPU")


def test_missing_model_folder(tmp_path, short_speech):
    result = transcribe_cli(tmp_path / "no-model", short_speech, tmp_path / "out", check=False)
    assert_one_line_error(result, "make convert")


@pytest.mark.parametrize("where,needle", [("proc", "cannot be written"), ("file", "is a file"),
                                          ("under-file", "is not a folder")])
def test_unusable_output_dir_is_one_line_before_any_work(tiny_model_dir, short_speech, tmp_path, where, needle):
    a_file = tmp_path / "a-file.txt"
    a_file.write_text("keep me")
    out = {"proc": Path("/proc/nope"), "file": a_file, "under-file": a_file / "out"}[where]
    result = transcribe_cli(tiny_model_dir, short_speech, out, check=False)
    assert_one_line_error(result, "--output-dir", needle)
    assert result.returncode == 1
    assert a_file.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file.txt"]


def test_clip_that_ends_before_it_starts_is_refused(tiny_model_dir, short_speech, tmp_path):
    result = transcribe_cli(tiny_model_dir, short_speech, tmp_path / "out", "--clip-timestamps", "5,2", check=False)
    assert_one_line_error(result, "--clip-timestamps", "clip 1")
    assert result.returncode == 1
    assert_nothing_written(tmp_path / "out")


def test_max_worker_threads_run_below_the_host_thread(tiny_runtime, monkeypatch):
    """A CPU model's load raises the nice value of MAX's worker threads by WHISPER_MAX_WORKER_NICE (default 10)
    over the host thread's, so their spinning after a graph call does not slow the host's work; a bad value
    is a one-line error naming the variable."""
    import os

    from runtime.engine import DEFAULT_WORKER_NICE, ArtifactError, lower_worker_priority

    if not os.path.isdir("/proc/self/task"):
        pytest.skip("threads have their own priority on Linux only")
    workers = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm", encoding="utf-8", errors="replace") as f:
            if f.read().startswith("🔥 Thread"):
                workers.append(int(tid))
    assert workers, "MAX's worker threads were not found by their name"
    expected = min(19, os.getpriority(os.PRIO_PROCESS, 0) + DEFAULT_WORKER_NICE)
    assert all(os.getpriority(os.PRIO_PROCESS, tid) >= expected for tid in workers)
    for bad in ("ten", "-1", "20", "2.5"):
        monkeypatch.setenv("WHISPER_MAX_WORKER_NICE", bad)
        with pytest.raises(ArtifactError, match=r"^WHISPER_MAX_WORKER_NICE must be a whole number from 0 to 19"):
            lower_worker_priority()


def test_the_first_files_log_mel_is_made_while_the_model_loads(tiny_model_dir, tiny_runtime, short_speech, tmp_path,
                                                                monkeypatch):
    """The CLI, and transcribe() given a model folder, start the file's log-mel before the model loads
    (runtime.api.prefetch_log_mel) and decode from it: the result of the loaded model on the path. A model
    that fails to load cancels it; one made with other Mel filters is refused."""
    import runtime.api as api
    from click.testing import CliRunner
    from runtime.audio import N_SAMPLES, LogMelPrefetch
    from runtime.cli import main
    from runtime.engine import ArtifactError

    made, cancelled = [], []
    prefetch, cancel = api.prefetch_log_mel, LogMelPrefetch.cancel

    def recorded(model_dir, path):
        made.append(prefetch(model_dir, path))
        return made[-1]

    def recorded_cancel(self):
        cancelled.append(self)
        cancel(self)

    monkeypatch.setattr(api, "prefetch_log_mel", recorded)
    monkeypatch.setattr(LogMelPrefetch, "cancel", recorded_cancel)
    options = dict(language="en", temperature=0.0, verbose=None)
    expected = api.transcribe(tiny_runtime, short_speech, **options)
    assert made == []  # a loaded model: nothing to overlap
    assert api.transcribe(str(tiny_model_dir), short_speech, **options) == expected
    assert len(made) == 1 and isinstance(made[0], LogMelPrefetch) and made[0].path == str(short_speech)

    out = tmp_path / "out"
    run = CliRunner().invoke(main, ["transcribe", str(short_speech), "--model", str(tiny_model_dir),
                                    "--output-dir", str(out), "--output-format", "json", *DECODE])
    assert run.exit_code == 0, run.output
    assert len(made) == 2 and made[1].path == str(short_speech)
    assert json.loads((out / "short.json").read_text())["text"] == expected["text"]

    uncompiled = tmp_path / "uncompiled"  # model.json and its files, no compiled target
    uncompiled.mkdir()
    for entry in tiny_model_dir.iterdir():
        if entry.is_file():
            (uncompiled / entry.name).symlink_to(entry)
    with pytest.raises(ArtifactError, match="make compile"):
        api.transcribe(str(uncompiled), short_speech, **options)
    assert len(made) == 3 and cancelled == [made[2]]

    other_filters = LogMelPrefetch(short_speech, tiny_runtime.mel_filters * 2, N_SAMPLES)
    with pytest.raises(ValueError, match="Mel filters"):
        api.transcribe(tiny_runtime, other_filters, **options)


def test_loading_a_model_starts_its_tokenizer(tiny_model_dir, tiny_runtime, monkeypatch):
    """load_model starts making the model's tokenizer (runtime.tokenizer.preload_encoding), which every
    transcription's first window needs, while the graphs load; the transcription then uses that one."""
    import runtime.engine as engine
    from runtime import tokenizer

    started = []
    monkeypatch.setattr(engine, "preload_encoding", lambda path, n: started.append((path, n)))
    model = engine.WhisperModel(tiny_model_dir)
    assert started == [(str(model.tokenizer_path), model.num_languages)]
    assert model.tokenizer_path.parent == tiny_model_dir and model.tokenizer_path.is_file()
    made = tokenizer.get_encoding(str(model.tokenizer_path), model.num_languages)
    assert tokenizer.get_tokenizer(model.tokenizer_path, model.is_multilingual,
                                   num_languages=model.num_languages).encoding is made


def test_max_version_is_importlib_metadatas(monkeypatch):
    """The version make compile records and the runtime checks, read from MAX's dist-info without
    importlib.metadata, is the one importlib.metadata gives; without a dist-info found, it asks it."""
    import importlib.util
    from importlib.metadata import version

    from contracts import max_version

    assert max_version() == version("max")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert max_version() == version("max")
