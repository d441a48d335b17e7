"""`graph-builders compile --decoder-weights fp16` on an fp32 checkpoint (a fine-tune, say).

The default keeps the decoder's weights in fp16 only where they are the checkpoint's exact values
(openai's files); `fp16` rounds an fp32 checkpoint's decoder weights as well: half the bytes per
token, other numerics. The manifest says so, and the encoder stays exact.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_tool


@pytest.fixture(scope="module")
def fp32_checkpoint(work_dir, tiny_checkpoint):
    """tiny's random weights in fp32, nudged off the fp16 grid so that rounding them changes them."""
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    generator = torch.Generator().manual_seed(1)
    checkpoint["model_state_dict"] = {
        name: tensor.float() + 1e-3 * torch.randn(tensor.shape, generator=generator)
        for name, tensor in checkpoint["model_state_dict"].items()}
    path = work_dir / "tiny-fp32.pt"
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def rounded_model_dir(work_dir, fp32_checkpoint):
    artifacts = work_dir / "artifacts"
    run_tool("converter", "convert", "--checkpoint", str(fp32_checkpoint), "--name", "tiny-fp32",
             "--out-dir", str(artifacts))
    compiled = run_tool("graph-builders", "compile", str(artifacts / "tiny-fp32"), "--device", "cpu",
                        "--decoder-weights", "fp16")
    assert "rounded to fp16" in compiled.stderr
    return artifacts / "tiny-fp32"


def test_manifest_says_the_decoder_weights_are_rounded(rounded_model_dir):
    manifest = json.loads((rounded_model_dir / "cpu" / "manifest.json").read_text())
    assert manifest["decoder_weights"] == {"dtype": "float16", "exact": False}
    step_weights = manifest["graphs"]["decoder_step"]["weights"]
    assert any(w["dtype"] == "float16" for w in step_weights)
    assert all(w["dtype"] == "float32" for w in manifest["graphs"]["encoder"]["weights"])


def test_rounded_decoder_stays_close_to_the_fp32_model(rounded_model_dir, fp32_checkpoint):
    import whisper

    from runtime import load_model

    reference = whisper.load_model(str(fp32_checkpoint), device="cpu").float().eval()
    ours = load_model(rounded_model_dir, device="cpu")
    rng = np.random.default_rng(3)
    mel = rng.uniform(-1.0, 1.5, size=(1, 80, 3000)).astype(np.float32)
    tokens = np.array([[50258, 50259, 50359, 50363, 440, 1000]])
    with torch.no_grad():
        audio = reference.encoder(torch.from_numpy(mel))
        expected = reference.decoder(torch.from_numpy(tokens), audio).numpy()
    features = ours.encode(mel)
    assert np.abs(features.buffer.to_numpy() - audio.numpy()).max() < 1e-4  # the encoder is not rounded
    session = ours.decoder(features)
    logits = np.concatenate([session.prefill(tokens[:, :4], [3])[:, 0],
                             session.step(tokens[:, 4]), session.step(tokens[:, 5])])
    error = np.abs(logits - expected[0, 3:]).max()
    # Rounding took effect (the exact path agrees to ~3e-6), and the model is still the same model.
    assert 1e-5 < error < 5e-2, error
