"""GPU artifacts: cross-compiled on this CPU-only host, and (where a GPU is attached) run against the CPU ones.

The tests marked `gpu` are skipped without an accelerator (conftest.py); the cross-compile test
runs everywhere, since building GPU artifacts must not need a GPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_tool

ARCH = "sm_90a"  # the default: what MAX names the H100 and H200


@pytest.fixture(scope="session")
def gpu_model_dir(tiny_model_dir):
    """The generated model, also compiled for an H100 (virtual device when none is attached)."""
    run_tool("graph-builders", "compile", str(tiny_model_dir), "--device", "gpu", "--arch", ARCH)
    return tiny_model_dir


def test_cross_compiled_gpu_artifacts(gpu_model_dir):
    from importlib.metadata import version

    target = gpu_model_dir / f"gpu-{ARCH}"
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["device"] == "gpu" and manifest["arch"] == ARCH
    assert manifest["max_version"] == version("max")
    cpu_manifest = json.loads((gpu_model_dir / "cpu" / "manifest.json").read_text())
    for name, graph in manifest["graphs"].items():
        assert (target / graph["file"]).stat().st_size > 0
        # the same checkpoint tensors as the CPU build, in the same layouts but where the CPU's fp16 kernel
        # reads panels (the GPU casts the (in, out) fp16 weight in the graph); a different signature
        cpu_weights = cpu_manifest["graphs"][name]["weights"]
        assert sorted({w["source"] for w in graph["weights"]}) == sorted({w["source"] for w in cpu_weights})
        cpu_layouts = {(w["source"], w["transform"], w["dtype"]) for w in cpu_weights}
        for weight in graph["weights"]:
            layout = (weight["source"], weight["transform"], weight["dtype"])
            assert layout in cpu_layouts or (weight["transform"], weight["dtype"]) == ("transpose", "float16") and \
                (weight["source"], "panels", "float16") in cpu_layouts, layout
        assert graph["signature"] != cpu_manifest["graphs"][name]["signature"]


@pytest.mark.parametrize("built,attached,used", [
    (["gpu-sm_90"], "sm_90a", "sm_90"),  # artifacts built for the base architecture (the old default)
    (["gpu-sm_90", "gpu-sm_90a"], "sm_90a", "sm_90a"),
    ([], "sm_90a", "sm_90a"),  # none: the error then names the attached architecture's make compile
    (["gpu-sm_90"], "sm_80", "sm_80"),
])
def test_artifacts_of_the_base_architecture_run_on_its_a_variant(tmp_path, built, attached, used):
    from runtime.engine import Target, _built_target

    for folder in built:
        (tmp_path / folder).mkdir()
    assert _built_target(tmp_path, Target("gpu", attached)) == Target("gpu", used)
    assert _built_target(tmp_path, Target("cpu", None)) == Target("cpu", None)


def test_second_gpu_compile_does_nothing(gpu_model_dir):
    from runtime.engine import GRAPHS

    result = run_tool("graph-builders", "compile", str(gpu_model_dir), "--device", "gpu", "--arch", ARCH)
    # every graph, and the target's weights file
    assert result.stderr.count("up to date") == len(GRAPHS) + 1, result.stderr
    assert "weights.safetensors: up to date" in result.stderr


def test_gpu_artifacts_refused_without_a_gpu(gpu_model_dir):
    from max import driver

    from runtime.engine import ArtifactError, WhisperModel

    if driver.accelerator_count() > 0:
        pytest.skip("a GPU is attached")
    with pytest.raises(ArtifactError, match="no GPU is attached"):
        WhisperModel(gpu_model_dir, device="gpu")


@pytest.mark.gpu
def test_gpu_arch_mismatch_is_refused(gpu_model_dir, isolated_copy):
    from max import driver

    from runtime.engine import ArtifactError, WhisperModel

    model = isolated_copy(gpu_model_dir)
    attached = driver.accelerator_architecture_name()
    other = "sm_80" if attached != "sm_80" else "sm_90"
    (model / f"gpu-{ARCH}").rename(model / f"gpu-{attached}")
    manifest_path = model / f"gpu-{attached}" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["arch"] = other
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="make compile"):
        WhisperModel(model, device="gpu")


@pytest.mark.gpu
def test_gpu_encoder_and_logits_match_cpu(gpu_model_dir, tiny_runtime):
    from runtime import load_model

    gpu = load_model(gpu_model_dir, device="gpu")
    rng = np.random.default_rng(3)
    mel = rng.uniform(-1.0, 1.5, size=(1, 80, 3000)).astype(np.float32)
    cpu_features, gpu_features = tiny_runtime.encode(mel), gpu.encode(mel)
    assert np.abs(gpu._to_host(gpu_features.buffer) - cpu_features.buffer.to_numpy()).max() < 1e-3
    tokens = np.array([[50258, 50259, 50359, 50363, 440]])
    cpu_session, gpu_session = tiny_runtime.decoder(cpu_features), gpu.decoder(gpu_features)
    assert np.abs(gpu_session.prefill(tokens, [4]) - cpu_session.prefill(tokens, [4])).max() < 1e-3
    assert np.abs(gpu_session.step(np.array([11])) - cpu_session.step(np.array([11]))).max() < 1e-3


@pytest.mark.gpu
def test_gpu_transcription_matches_cpu(gpu_model_dir, tiny_runtime, speech_72s):
    import runtime

    options = dict(language="en", temperature=0.0, verbose=None)
    gpu = runtime.load_model(gpu_model_dir, device="gpu")
    ours_gpu = runtime.transcribe(gpu, speech_72s, **options)
    ours_cpu = runtime.transcribe(tiny_runtime, speech_72s, **options)
    assert [s["tokens"] for s in ours_gpu["segments"]] == [s["tokens"] for s in ours_cpu["segments"]]
