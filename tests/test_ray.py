"""Many files on Ray (runtime/ray_jobs.py) and `runtime transcribe-many` (runtime/transcribe_many.py).

One local Ray instance (2 CPUs, loopback only) serves the module. The random-weight model decodes to the
token limit on every chunk, so the files are short and sample_len is small: the point is that what comes
back through Ray, or through the command, is what runtime.transcribe_batch returns for the same files.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow  # noqa: F401  (before any test loads a MAX model: runtime/ray_jobs.py, _import_pyarrow_first)
import pytest

from audio_samples import synthesize_speech
from conftest import run_tool

OPTIONS = dict(language="en", temperature=0.0, beam_size=None, sample_len=24, condition_on_previous_text=False)
CLI_OPTIONS = ["--language", "en", "--temperature", "0", "--temperature-increment-on-fallback", "none",
               "--beam-size", "none", "--sample-len", "24", "--batch-size", "4"]


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray instance for this module; its GCS address (127.0.0.1:port) for the command to join."""
    # Ray would put a local instance on this machine's network address; keep it on loopback. Read when ray
    # is imported, and inherited by Ray's daemons and by the commands the tests start.
    previous = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    address = ray.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:"), address
    yield address
    ray.shutdown()
    if previous is None:
        del os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"]
    else:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = previous


@pytest.fixture(scope="module")
def speech_files(work_dir) -> list[Path]:
    """Three short files (one 30 s chunk each), of different lengths."""
    folder = work_dir / "ray-audio"
    return [synthesize_speech(folder / f"clip{n}.wav", n_sentences=n) for n in (1, 3, 2)]


@pytest.fixture(scope="module")
def bad_files(work_dir) -> list[Path]:
    """A file that is not audio, and a path with nothing there."""
    broken = work_dir / "ray-audio" / "broken.wav"
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_bytes(b"this is not audio")
    return [broken, work_dir / "ray-audio" / "missing.wav"]


@pytest.fixture(scope="module")
def expected(tiny_runtime, speech_files) -> dict[str, dict]:
    """runtime.transcribe_batch's result for each file, by file name."""
    import runtime

    results = runtime.transcribe_batch(tiny_runtime, speech_files, batch_size=4, **OPTIONS)
    assert all(result["segments"] for result in results)
    return {path.name: result for path, result in zip(speech_files, results)}


def _assert_same(got: dict, want: dict) -> None:
    assert [s["tokens"] for s in got["segments"]] == [s["tokens"] for s in want["segments"]]
    assert got == want  # segments with their times, text, language


def test_map_batches_returns_transcribe_batch_results(ray_address, tiny_model_dir, speech_files, bad_files,
                                                      expected):
    import ray

    from runtime.ray_jobs import transcribe_dataset

    rows_in = [{"path": str(p), "tag": i} for i, p in enumerate([*speech_files, *bad_files])]
    results = transcribe_dataset(ray.data.from_items(rows_in, override_num_blocks=3), tiny_model_dir, workers=2,
                                 files_per_call=2, batch_size=4, **OPTIONS).take_all()
    by_name = {Path(row["path"]).name: row for row in results}
    assert sorted(by_name) == sorted(Path(row["path"]).name for row in rows_in)
    for name, want in expected.items():
        row = by_name[name]
        assert row["error"] == ""
        _assert_same(json.loads(row["result"]), want)
        assert row["text"] == want["text"] and row["language"] == "en"
    # the input's other columns come through
    assert {row["tag"] for row in results} == set(range(len(rows_in)))
    # a file that cannot be read fails its own row only
    assert "ffmpeg cannot decode" in by_name["broken.wav"]["error"]
    assert "not found" in by_name["missing.wav"]["error"]
    assert by_name["broken.wav"]["result"] == by_name["missing.wav"]["result"] == ""


def test_map_batches_takes_file_bytes(ray_address, tiny_model_dir, speech_files, expected):
    """Rows of bytes, as ray.data.read_binary_files makes them, give the results of the same files by path."""
    import ray

    from runtime.ray_jobs import transcribe_dataset

    files = ray.data.read_binary_files([str(p) for p in speech_files[:2]], include_paths=True)
    results = transcribe_dataset(files, tiny_model_dir, workers=1, files_per_call=2, batch_size=4,
                                 **OPTIONS).take_all()
    assert len(results) == 2
    for row in results:
        assert "bytes" not in row and row["error"] == ""
        _assert_same(json.loads(row["result"]), expected[Path(row["path"]).name])


def _manifest(path: Path, speech_files, bad_files) -> Path:
    path.write_text("# test manifest\n\n" + "".join(f"{p}\n" for p in [*speech_files, *bad_files]))
    return path


def _check_outputs(out: Path, result, speech_files, bad_files, expected, names=None) -> dict:
    """The command's outputs: one JSON per good file, equal to transcribe_batch's; one error line per bad one."""
    names = names or {p: p.stem for p in [*speech_files, *bad_files]}
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, result.stderr
    assert str(bad_files[0]) in errors[0] and "ffmpeg cannot decode" in errors[0]
    assert str(bad_files[1]) in errors[1] and "not found" in errors[1]
    for path in speech_files:
        _assert_same(json.loads((out / f"{names[path]}.json").read_text()), expected[path.name])
    for path in bad_files:
        assert not (out / f"{names[path]}.json").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["files"] == 5 and summary["transcribed"] == 3
    assert [f["path"] for f in summary["failed"]] == [str(p) for p in bad_files]
    return summary


def test_cli_on_ray_writes_what_transcribe_batch_returns(ray_address, tiny_model_dir, speech_files, bad_files,
                                                         expected, tmp_path):
    manifest = _manifest(tmp_path / "files.txt", speech_files, bad_files)
    out = tmp_path / "out"
    result = run_tool("runtime", "transcribe-many", str(manifest), "--model", str(tiny_model_dir), "-o", str(out),
                      "--ray", ray_address, "--workers", "2", "--files-per-call", "2", *CLI_OPTIONS, check=False,
                      timeout=600)
    summary = _check_outputs(out, result, speech_files, bad_files, expected)
    assert summary["ray"] == ray_address and summary["workers"] == 2


def test_cli_without_ray_writes_the_same_and_never_imports_ray(tiny_model_dir, speech_files, bad_files, expected,
                                                               tmp_path):
    """A JSONL manifest with ids and relative paths; the command runs in this process with transcribe_batch."""
    names = {p: f"id-{i}" for i, p in enumerate([*speech_files, *bad_files])}
    manifest = tmp_path / "files.jsonl"
    manifest.write_text("".join(json.dumps({"path": os.path.relpath(p, tmp_path), "id": names[p]}) + "\n"
                                for p in [*speech_files, *bad_files]))
    out = tmp_path / "out"
    # the command, then whether anything imported ray
    code = ("import sys\nfrom runtime.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as exc:\n"
            "    code = exc.code\nprint('ray imported:', 'ray' in sys.modules)\nsys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", code, "transcribe-many", str(manifest), "--model",
                             str(tiny_model_dir), "-o", str(out), "--files-per-call", "2", *CLI_OPTIONS],
                            capture_output=True, text=True, timeout=600)
    summary = _check_outputs(out, result, speech_files, bad_files, expected, names)
    assert summary["ray"] is None
    assert "ray imported: False" in result.stdout


def _one_error_line(result) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_bad_input_is_one_line(tiny_model_dir, speech_files, tmp_path):
    manifest = tmp_path / "files.txt"
    manifest.write_text(f"{speech_files[0]}\n")
    model = ["--model", str(tiny_model_dir)]

    def run(*args, manifest=manifest):
        return run_tool("runtime", "transcribe-many", str(manifest), *args, check=False, timeout=120)

    assert "not found" in _one_error_line(run(*model, "-o", str(tmp_path / "o1"), manifest=tmp_path / "nope.txt"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert "cannot write to output folder" in _one_error_line(run(*model, "-o", str(blocker / "out")))
    assert "model folder" in _one_error_line(run("--model", str(tmp_path / "no-model"), "-o", str(tmp_path / "o2")))
    assert "beam_size" in _one_error_line(run(*model, "-o", str(tmp_path / "o3"), "--beam-size", "0"))

    duplicate = tmp_path / "twice.txt"
    duplicate.write_text(f"{speech_files[0]}\n{speech_files[0]}\n")
    assert "output name" in _one_error_line(run(*model, "-o", str(tmp_path / "o4"), manifest=duplicate))

    with socket.socket() as probe:  # a loopback port with nothing listening
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    line = _one_error_line(run(*model, "-o", str(tmp_path / "o5"), "--ray", f"127.0.0.1:{closed_port}"))
    assert "cannot reach a Ray cluster" in line
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3, 4))


def test_a_ray_address_that_never_answers_times_out(tiny_model_dir, speech_files, tmp_path):
    """A port that accepts connections but is not Ray: Ray would wait for minutes; the command gives up."""
    manifest = tmp_path / "files.txt"
    manifest.write_text(f"{speech_files[0]}\n")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = "127.0.0.1:%d" % silent.getsockname()[1]
        result = run_tool("runtime", "transcribe-many", str(manifest), "--model", str(tiny_model_dir),
                          "-o", str(tmp_path / "out"), "--ray", address, "--connect-timeout", "3",
                          check=False, timeout=120)
    assert f"no answer from Ray at {address} within 3 s" in _one_error_line(result)


def test_manifest_formats(tmp_path):
    from runtime.manifest import ManifestError, read_manifest

    (tmp_path / "sub").mkdir()
    text = tmp_path / "sub" / "list.txt"
    text.write_text("# comment\n\n  a.wav  \n/abs/b.mp3\n../c.flac\n")
    entries = read_manifest(text)
    assert [(e.path, e.name, e.line) for e in entries] == [
        (str(tmp_path / "sub" / "a.wav"), "a", 3), ("/abs/b.mp3", "b", 4), (str(tmp_path / "c.flac"), "c", 5)]

    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text('{"path": "x/a.wav", "id": "first"}\n\n{"path": "y/a.wav", "id": 2}\n')
    assert [(e.path, e.name) for e in read_manifest(jsonl)] == [
        (str(tmp_path / "x" / "a.wav"), "first"), (str(tmp_path / "y" / "a.wav"), "2")]

    for content, message in [('{"path": "x/a.wav"}\n{"path": "y/a.wav"}\n', "output name 'a'"),
                             ('{"file": "a.wav"}\n', "needs"), ("not json\n", "not a JSON object"),
                             ('{"path": "a.wav", "id": "../up"}\n', "cannot name"),
                             ('{"path": "_summary.wav"}\n', "summary"), ("\n\n", "no audio files")]:
        jsonl.write_text(content)
        with pytest.raises(ManifestError, match=message):
            read_manifest(jsonl)
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "absent.txt")


def test_a_file_that_breaks_its_batch_costs_only_its_own_row():
    """When transcribe_batch raises for a batch, each file is tried alone: only the culprit gets the error."""
    import numpy as np

    from runtime.ray_jobs import Transcriber

    calls = []

    def transcribe_batch(model, samples, batch_size, **options):
        calls.append(len(samples))
        if any(len(s) == 3 for s in samples):
            raise ValueError("cannot take this one")
        return [{"text": f"{len(s)} samples", "segments": [], "language": "en"} for s in samples]

    transcriber = object.__new__(Transcriber)  # the batching logic alone: no model behind it
    transcriber._transcribe_batch, transcriber.model, transcriber.batch_size, transcriber.options = \
        transcribe_batch, None, 8, {}
    outcomes = transcriber._transcribe([np.zeros(n, np.float32) for n in (1, 3, 2)])
    assert outcomes == [{"text": "1 samples", "segments": [], "language": "en"}, "ValueError: cannot take this one",
                        {"text": "2 samples", "segments": [], "language": "en"}]
    assert calls == [3, 1, 1, 1]
