"""Compiled graphs against openai-whisper's torch model: encoder output and decoder logits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

TOLERANCE = 1e-4  # observed: about 3e-6 (float32, different summation order)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(7)
    mel = rng.uniform(-1.0, 1.5, size=(2, 80, 3000)).astype(np.float32)
    tokens = np.array([[50258, 50259, 50359, 50363, 440, 1000, 7],
                       [50258, 50259, 50359, 50363, 2000, 300, 11]])
    return mel, tokens


@pytest.fixture(scope="module")
def reference(torch_tiny, inputs):
    mel, tokens = inputs
    with torch.no_grad():
        audio = torch_tiny.encoder(torch.from_numpy(mel))
        logits = torch_tiny.decoder(torch.from_numpy(tokens), audio)
    return audio.numpy(), logits.numpy()


def test_encoder_matches_torch(tiny_runtime, inputs, reference):
    features = tiny_runtime.encode(inputs[0])
    ours = features.buffer.to_numpy()
    assert ours.shape == reference[0].shape == (2, 1500, 384)
    assert np.abs(ours - reference[0]).max() < TOLERANCE


def test_a_batch_is_encoded_as_its_windows_alone(tiny_runtime, inputs):
    # on CPU the engine runs a batch's windows one at a time (their attention scores are not held
    # together): the same numbers as encoding each window by itself
    both = tiny_runtime.encode(inputs[0])
    assert both.batch_size == 2
    for i in range(2):
        alone = tiny_runtime.encode(inputs[0][i:i + 1]).buffer.to_numpy()
        assert np.array_equal(both.row(i).buffer.to_numpy(), alone)


def _prefill_then_steps_match_torch(model, inputs, reference):
    mel, tokens = inputs
    session = model.decoder(model.encode(mel))
    prefix = 4
    logits = session.prefill(tokens[:, :prefix], [0, prefix - 1])
    assert logits.shape == (2, 2, 51865)
    assert np.abs(logits - reference[1][:, [0, prefix - 1]]).max() < TOLERANCE
    for position in range(prefix, tokens.shape[1]):
        step = session.step(tokens[:, position])
        assert step.shape == (2, 51865)
        assert np.abs(step - reference[1][:, position]).max() < TOLERANCE, f"position {position}"
    return session


def _rows_at_different_positions_match_torch(model, inputs, reference):
    """Continuous batching's seam (runtime.engine.MaxRowBatch): a row joins while another is two
    positions ahead, both step together at their own positions, the first leaves, a third joins
    into the freed place (and the pools grow past their first slot), and every logit is torch's."""
    from runtime.engine import MaxRowBatch

    mel, tokens = inputs
    features = model.encode(mel)
    rows = MaxRowBatch(model, max_rows=3)

    def close(logits, audio, positions):
        return np.abs(logits - reference[1][audio, positions]).max() < TOLERANCE

    assert close(rows.join(features.row(0), tokens[0, :4], [0, 3])[0], 0, [0, 3])
    assert close(rows.step(tokens[0, [4]])[0], 0, 4)
    assert close(rows.join(features.row(1), tokens[1, :3], [2])[0], 1, [2])
    assert rows.positions == [5, 3] and rows.slots == 2
    logits = rows.step(tokens[[0, 1], [5, 3]])
    assert close(logits[0], 0, 5) and close(logits[1], 1, 3)
    rows.leave(0)  # row 1 (audio 1) is now row 0
    assert close(rows.join(features.row(0), tokens[0, :2], [1])[0], 0, [1])
    assert rows.positions == [4, 2] and len(rows) == 2
    logits = rows.step(tokens[[1, 0], [4, 2]])
    assert close(logits[0], 1, 4) and close(logits[1], 0, 2)
    assert close(rows.join(features.row(1), tokens[1, :5], [4])[0], 1, [4])
    assert rows.slots == 3
    logits = rows.step(tokens[[1, 0, 1], [5, 3, 5]])
    assert close(logits[0], 1, 5) and close(logits[1], 0, 3) and close(logits[2], 1, 5)


def test_rows_at_different_positions_match_torch(tiny_runtime, inputs, reference):
    _rows_at_different_positions_match_torch(tiny_runtime, inputs, reference)


def test_prefill_then_steps_match_torch(tiny_runtime, inputs, reference, monkeypatch):
    from runtime.engine import MaxDecoderSession

    # room for 2 positions past the prefill: the cache buffers fill up and are reallocated
    monkeypatch.setattr(MaxDecoderSession, "ROOM", 2)
    session = _prefill_then_steps_match_torch(tiny_runtime, inputs, reference)
    assert session.capacity == 8 and session.length == 7


# A GPU has no custom kernels: its step merges the new position into the cache with stock ops,
# stores it back and masks the positions after it. No GPU here, so that graph is built for CPU.
WITHOUT_ATTENTION_KERNELS = """
import sys
from pathlib import Path
from graph_builders import graphs
from graph_builders.compile import compile_model
built = graphs.WhisperGraphs.__init__
def without_attention_kernels(self, *args, **kwargs):
    built(self, *args, **kwargs)
    self.use_attention_kernel = False
graphs.WhisperGraphs.__init__ = without_attention_kernels
compile_model(Path(sys.argv[1]), "cpu", log=print)
"""


def test_step_with_stock_ops_matches_torch(tiny_model_dir, isolated_copy, inputs, reference, monkeypatch):
    from runtime.engine import MaxDecoderSession, WhisperModel

    model_dir = isolated_copy(tiny_model_dir)
    shutil.rmtree(model_dir / "cpu")
    subprocess.run([sys.executable, "-c", WITHOUT_ATTENTION_KERNELS, str(model_dir)], check=True)
    step_signature = json.loads((model_dir / "cpu" / "manifest.json").read_text())["graphs"]["decoder_step"]["signature"]
    assert step_signature != json.loads((tiny_model_dir / "cpu" / "manifest.json").read_text())["graphs"]["decoder_step"]["signature"]
    monkeypatch.setattr(MaxDecoderSession, "ROOM", 2)
    model = WhisperModel(model_dir)
    _prefill_then_steps_match_torch(model, inputs, reference)
    _rows_at_different_positions_match_torch(model, inputs, reference)

    mel, tokens = inputs
    session = model.decoder(model.encode(mel), repeats=2)
    session.prefill(tokens[[0, 0, 1, 1], :5], [4])
    session.reorder([2, 3, 0, 1])
    assert np.abs(session.step(tokens[[1, 1, 0, 0], 5]) - reference[1][[1, 1, 0, 0], 5]).max() < TOLERANCE


def test_repeats_and_reorder_follow_their_rows(tiny_runtime, inputs, reference):
    """Each audio row serves `repeats` sequences; reorder moves cache rows (beam search's seam)."""
    mel, tokens = inputs
    session = tiny_runtime.decoder(tiny_runtime.encode(mel), repeats=2)
    rows = tokens[[0, 0, 1, 1], :5]
    session.prefill(rows, [4])
    session.reorder([2, 3, 0, 1])  # rows now hold audio 1, 1, 0, 0
    step = session.step(tokens[[1, 1, 0, 0], 5])
    expected = reference[1][[1, 1, 0, 0], 5]
    assert np.abs(step - expected).max() < TOLERANCE


def test_manifest_records_provenance(tiny_model_dir):
    from importlib.metadata import version

    manifest = json.loads((tiny_model_dir / "cpu" / "manifest.json").read_text())
    model = json.loads((tiny_model_dir / "model.json").read_text())
    assert manifest["max_version"] == version("max")
    assert manifest["device"] == "cpu" and manifest["arch"] is None
    assert manifest["model"]["weights_sha256"] == model["weights"]["sha256"]
    assert manifest["model"]["source_sha256"] == model["source"]["sha256"]
    assert set(manifest["graphs"]) == {"encoder", "decoder_prefill", "decoder_step", "decoder_alignment"}
    for graph in manifest["graphs"].values():
        assert len(graph["signature"]) == 64 and graph["weights"] and graph["inputs"]


def test_one_copy_of_each_checkpoint_tensor_per_layout(tiny_model_dir):
    # the token embedding, the largest weight, is bound once: fp16 panels of 64 tokens for the output
    # projection (the kernel's layout), whose columns are also the embedding the decoder gathers
    manifest = json.loads((tiny_model_dir / "cpu" / "manifest.json").read_text())
    dims = json.loads((tiny_model_dir / "model.json").read_text())["dims"]
    specs = {spec["name"]: spec for graph in manifest["graphs"].values() for spec in graph["weights"]}
    embedding = [spec for spec in specs.values() if spec["source"] == "decoder.token_embedding.weight"]
    assert [(spec["transform"], spec["dtype"], spec["shape"]) for spec in embedding] == [
        ("panels", "float16", [-(-dims["n_vocab"] // 64), dims["n_text_state"] * 64])]


def test_target_weights_are_the_specs_made_from_the_checkpoint(tiny_model_dir):
    # make compile writes every graph weight, made from its checkpoint tensor, into the target's own
    # file; the runtime reads it as it is, each tensor starting on a cache line
    from safetensors.numpy import load_file

    from contracts import WEIGHTS_ALIGNMENT, sha256_file
    from graph_builders.weights import make_weights
    from runtime.engine import _read_weights

    target = tiny_model_dir / "cpu"
    manifest = json.loads((target / "manifest.json").read_text())
    entry = manifest["weights"]
    path = target / entry["file"]
    assert sha256_file(path) == entry["sha256"] and path.stat().st_size == entry["bytes"]
    specs = list({spec["name"]: spec for graph in manifest["graphs"].values() for spec in graph["weights"]}.values())
    read = _read_weights(path, "make compile")
    assert sorted(read) == sorted(spec["name"] for spec in specs)
    expected = make_weights(specs, load_file(str(tiny_model_dir / "weights.safetensors")))
    for name, array in read.items():
        assert array.dtype == expected[name].dtype and array.shape == expected[name].shape, name
        assert array.tobytes() == expected[name].tobytes(), name
        assert array.ctypes.data % WEIGHTS_ALIGNMENT == 0, name
