"""The convert stage: every tensor extracted bit for bit, dims and assets recorded, validated."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_tool
from safetensors.torch import load_file

from converter.checkpoint import expected_tensor_names


def test_every_tensor_extracted_bit_equal(tiny_model_dir, tiny_checkpoint):
    state = torch.load(tiny_checkpoint, weights_only=True)["model_state_dict"]
    stored = load_file(str(tiny_model_dir / "weights.safetensors"))
    assert len(stored) == len(state) == 167
    for name, tensor in state.items():
        assert stored[name].dtype == tensor.dtype == torch.float16, name
        assert torch.equal(stored[name].view(torch.int16), tensor.view(torch.int16)), name
    assert set(state) == expected_tensor_names(json.loads((tiny_model_dir / "model.json").read_text())["dims"])


def test_model_json_records_dims_assets_and_source(tiny_model_dir, tiny_checkpoint):
    from converter.checkpoint import sha256_file
    from checkpoints import TINY_DIMS

    model = json.loads((tiny_model_dir / "model.json").read_text())
    assert model["dims"] == TINY_DIMS
    assert model["is_multilingual"] is True and model["num_languages"] == 99
    assert model["alignment_heads"] is None  # not an official file: openai-whisper's default applies
    assert model["source"]["sha256"] == sha256_file(tiny_checkpoint)
    assert model["tensor_count"] == 167
    for asset in ("weights", "tokenizer", "mel_filters"):
        assert sha256_file(tiny_model_dir / model[asset]["file"]) == model[asset]["sha256"]
    with np.load(tiny_model_dir / "mel_filters.npz") as filters:
        assert filters["mel_80"].shape == (80, 201)
    assert (tiny_model_dir / "multilingual.tiktoken").stat().st_size > 100_000


def test_validation_report_within_tolerance(tiny_model_dir):
    report = json.loads((tiny_model_dir / "validation.json").read_text())
    assert report["passed"] is True
    assert report["tensors"] == {"count": 167, "bit_equal": 167}
    assert report["encoder"]["max_abs"] <= report["tolerance"]["encoder_max_abs"]
    assert report["logits"]["max_abs"] <= report["tolerance"]["logits_max_abs"]
    assert report["encoder"]["reference_max_abs"] > 0.1  # the comparison saw real activations


def test_second_convert_is_a_no_op(tiny_model_dir, tiny_checkpoint):
    before = (tiny_model_dir / "weights.safetensors").stat().st_mtime_ns
    result = run_tool("converter", "convert", "--checkpoint", str(tiny_checkpoint), "--name", tiny_model_dir.name,
                      "--out-dir", str(tiny_model_dir.parent))
    assert "up to date" in result.stdout
    assert (tiny_model_dir / "weights.safetensors").stat().st_mtime_ns == before


class Gadget:  # a class torch.load(weights_only=True) must refuse to unpickle
    pass


@pytest.mark.parametrize("content", ["not-whisper-dict", "random-bytes", "pickled-object", "missing-tensor", "empty"])
def test_bad_checkpoint_is_one_line_error_and_writes_nothing(tmp_path, content, tiny_checkpoint):
    path = tmp_path / "bad.pt"
    if content == "not-whisper-dict":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    elif content == "random-bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif content == "pickled-object":
        torch.save({"dims": Gadget(), "model_state_dict": {}}, path)
    elif content == "missing-tensor":
        data = torch.load(tiny_checkpoint, weights_only=True)
        del data["model_state_dict"]["decoder.ln.weight"]
        torch.save(data, path)
    else:
        path.write_bytes(b"")
    out = tmp_path / "artifacts"
    result = run_tool("converter", "convert", "--checkpoint", str(path), "--name", "bad", "--out-dir", str(out), check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "bad" / "model.json").exists()
    assert not (out / "bad" / "weights.safetensors").exists()


def test_missing_checkpoint(tmp_path):
    result = run_tool("converter", "convert", "--checkpoint", str(tmp_path / "nope.pt"), "--out-dir", str(tmp_path),
                      check=False)
    assert result.returncode != 0 and result.stderr.strip() == f"error: checkpoint not found: {tmp_path / 'nope.pt'}"
