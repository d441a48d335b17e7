"""`converter export-onnx`: ONNX models from a converted folder, run by onnxruntime against openai-whisper.

The reference is openai-whisper's torch model loaded from the original .pt (the torch_tiny fixture),
not the exporter's own rebuild from the safetensors. Greedy decoding compares token ids; where the
reference's own top-2 logits differ by less than TIE_EPSILON, a different pick is reported as a
tie (and the rest of that row is not comparable), never hidden.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_tool

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from converter.checkpoint import sha256_file  # noqa: E402
from converter.onnx_export import DEFAULT_OPSET, move_exported, sessions, signatures  # noqa: E402
from converter.validate import TOLERANCE  # noqa: E402

TIE_EPSILON = 1e-4
GREEDY_TOKENS = 20
MODELS = ("encoder", "decoder_init", "decoder_step")


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory, tiny_checkpoint):
    """The tiny checkpoint converted (not compiled: export needs only weights and model.json)."""
    out = tmp_path_factory.mktemp("onnx-artifacts")
    run_tool("converter", "convert", "--checkpoint", str(tiny_checkpoint), "--name", "tiny-random",
             "--out-dir", str(out))
    return out / "tiny-random"


@pytest.fixture(scope="module")
def onnx_dir(converted_dir):
    result = run_tool("converter", "export-onnx", str(converted_dir))
    assert "exported" in result.stdout, result.stdout
    return converted_dir / "onnx"


@pytest.fixture(scope="module")
def ort_models(onnx_dir):
    return sessions(onnx_dir)


@pytest.fixture(scope="module")
def n_layer(torch_tiny):
    return torch_tiny.dims.n_text_layer


def random_mel(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.5, size=(batch, 80, 3000)).astype(np.float32)


def max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


class OnnxDecoder:
    """Drives decoder_init then decoder_step, keeping the caches as onnxruntime outputs."""

    def __init__(self, ort_models, n_layer: int):
        self.models = ort_models
        self.n_layer = n_layer
        self.step_inputs = signatures(n_layer)["decoder_step"]["inputs"]
        self.self_kv = self.cross_kv = None

    def start(self, tokens: np.ndarray, audio: np.ndarray) -> np.ndarray:
        logits, *caches = self.models["decoder_init"].run(None, {"tokens": tokens, "audio_features": audio})
        self.self_kv, self.cross_kv = caches[: 2 * self.n_layer], caches[2 * self.n_layer:]
        return logits

    def step(self, tokens: np.ndarray) -> np.ndarray:
        feeds = dict(zip(self.step_inputs, [tokens, *self.self_kv, *self.cross_kv]))
        logits, *self.self_kv = self.models["decoder_step"].run(None, feeds)
        return logits

    def reorder(self, rows) -> None:
        self.self_kv = [t[rows] for t in self.self_kv]


def test_export_writes_checked_models_and_manifest(onnx_dir, converted_dir):
    model_json = json.loads((converted_dir / "model.json").read_text())
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    assert manifest["source"]["weights_sha256"] == model_json["weights"]["sha256"]
    assert manifest["opset"] == DEFAULT_OPSET
    assert set(manifest["versions"]) == {"torch", "onnx", "onnxruntime", "openai-whisper"}
    assert manifest["versions"]["onnx"] == onnx.__version__
    assert sorted(manifest["files"]) == sorted(p.name for p in onnx_dir.iterdir() if p.name != "manifest.json")
    for name, entry in manifest["files"].items():
        assert sha256_file(onnx_dir / name) == entry["sha256"], name
    assert not [p for p in converted_dir.iterdir() if p.name.startswith(".")], "temporary folders left behind"

    for name in MODELS:
        proto = onnx.load(str(onnx_dir / f"{name}.onnx"))
        onnx.checker.check_model(proto, full_check=True)
        assert any(o.version == DEFAULT_OPSET for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    step = {v["name"]: v["shape"] for v in manifest["models"]["decoder_step"]["inputs"]}
    assert step["tokens"] == ["batch", "new_tokens"]
    assert step["past_self_key_0"] == ["batch", "past", 384]
    assert step["cross_value_3"] == ["batch", 1500, 384]

    report = json.loads((onnx_dir / "validation.json").read_text())
    assert report["passed"] is True and report["tolerance"] == TOLERANCE
    for key in ("encoder", "decoder_init_logits", "decoder_step_logits"):
        assert report[key]["max_abs"] <= 1e-3, (key, report[key])
    print(f"\nvalidation.json max abs errors: encoder {report['encoder']['max_abs']:.2e}, decoder_init logits "
          f"{report['decoder_init_logits']['max_abs']:.2e}, decoder_step logits {report['decoder_step_logits']['max_abs']:.2e}")


def test_onnxruntime_matches_whisper_torch_model(ort_models, torch_tiny, n_layer):
    """Batch 2, lengths the exporter never traced: the encoder, decoder_init on 7 tokens, then
    decoder_step with 2 tokens at once and with 1, against the uncached torch forward pass."""
    mel = random_mel(2, seed=7)
    tokens = np.random.default_rng(8).integers(0, 51865, size=(2, 10))
    with torch.no_grad():
        torch_audio = torch_tiny.encoder(torch.from_numpy(mel))
        torch_logits = torch_tiny.decoder(torch.from_numpy(tokens), torch_audio).numpy()
    audio = ort_models["encoder"].run(None, {"mel": mel})[0]
    errors = {"encoder": max_abs(audio, torch_audio.numpy())}

    decoder = OnnxDecoder(ort_models, n_layer)
    logits = decoder.start(tokens[:, :7], audio)
    errors["decoder_init"] = max_abs(logits, torch_logits[:, :7])
    assert [t.shape for t in decoder.cross_kv] == [(2, 1500, 384)] * (2 * n_layer)
    logits = decoder.step(tokens[:, 7:9])
    errors["decoder_step, 2 tokens"] = max_abs(logits, torch_logits[:, 7:9])
    logits = decoder.step(tokens[:, 9:10])
    errors["decoder_step, 1 token"] = max_abs(logits, torch_logits[:, 9:10])
    assert [t.shape for t in decoder.self_kv] == [(2, 10, 384)] * (2 * n_layer)

    print(f"\nonnxruntime vs openai-whisper max abs errors: {errors}")
    assert all(e <= 1e-3 for e in errors.values()), errors


def whisper_greedy(model, prefix: np.ndarray, audio: torch.Tensor, n: int):
    """openai-whisper's own cached inference (PyTorchInference: its kv-cache hooks), argmax each
    step. Returns the tokens and each step's logits."""
    from whisper.decoding import PyTorchInference

    inference = PyTorchInference(model, prefix.shape[1])
    tokens = torch.from_numpy(prefix)
    all_logits = []
    try:
        with torch.no_grad():
            for _ in range(n):
                logits = inference.logits(tokens, audio)[:, -1]
                all_logits.append(logits.numpy())
                tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    finally:
        inference.cleanup_caching()
    return tokens[:, prefix.shape[1]:].numpy(), np.stack(all_logits, axis=1)


def onnx_greedy(ort_models, n_layer: int, prefix: np.ndarray, audio: np.ndarray, n: int) -> np.ndarray:
    decoder = OnnxDecoder(ort_models, n_layer)
    logits = decoder.start(prefix, audio)
    picked = []
    for _ in range(n):
        next_tokens = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        picked.append(next_tokens)
        if len(picked) < n:
            logits = decoder.step(next_tokens)
    return np.concatenate(picked, axis=1)


def test_greedy_decode_through_onnx_matches_whisper(ort_models, torch_tiny, n_layer):
    from whisper.tokenizer import get_tokenizer

    tokenizer = get_tokenizer(True, num_languages=99, language="en", task="transcribe")
    prefix = np.array([tokenizer.sot_sequence_including_notimestamps] * 2, dtype=np.int64)
    mel = random_mel(2, seed=11)
    with torch.no_grad():
        torch_audio = torch_tiny.encoder(torch.from_numpy(mel))
    reference, reference_logits = whisper_greedy(torch_tiny, prefix, torch_audio, GREEDY_TOKENS)
    audio = ort_models["encoder"].run(None, {"mel": mel})[0]
    ours = onnx_greedy(ort_models, n_layer, prefix, audio, GREEDY_TOKENS)

    compared, ties = 0, []
    for row in range(len(prefix)):
        differ = np.flatnonzero(reference[row] != ours[row])
        if differ.size == 0:
            compared += GREEDY_TOKENS
            continue
        index = int(differ[0])
        top2 = np.sort(reference_logits[row, index])[-2:]
        margin = float(top2[1] - top2[0])
        assert margin < TIE_EPSILON, (f"row {row}: token {index} differs ({reference[row, index]} vs "
                                      f"{ours[row, index]}) where whisper's top-2 logits differ by {margin:.3g}")
        ties.append((row, index, margin))
        compared += index
    print(f"\ngreedy through ONNX: {compared} tokens identical to openai-whisper's in {len(prefix)} rows; ties: {ties}")
    assert compared >= GREEDY_TOKENS  # at least one whole row was comparable


def test_whisper_decoding_task_runs_on_onnx(ort_models, torch_tiny, n_layer):
    """openai-whisper's full decoding loop (logit filters, timestamp rules, stopping) with the ONNX
    models swapped in for its torch inference gives whisper.decode's tokens."""
    import whisper
    from whisper.decoding import DecodingTask, Inference

    class OnnxInference(Inference):
        def __init__(self, initial_token_length: int):
            self.initial_token_length = initial_token_length
            self.decoder = None

        def logits(self, tokens, audio_features):
            if self.decoder is None:
                self.decoder = OnnxDecoder(ort_models, n_layer)
                return torch.from_numpy(self.decoder.start(tokens.numpy(), audio_features.numpy()))
            return torch.from_numpy(self.decoder.step(tokens[:, -1:].numpy()))

        def rearrange_kv_cache(self, source_indices):
            if source_indices != list(range(len(source_indices))):
                self.decoder.reorder(source_indices)

        def cleanup_caching(self):
            self.decoder = None

    mel = torch.from_numpy(random_mel(1, seed=12))
    options = whisper.DecodingOptions(language="en", fp16=False, temperature=0.0, sample_len=GREEDY_TOKENS)
    reference = whisper.decode(torch_tiny, mel, options)

    task = DecodingTask(torch_tiny, options)
    task.inference = OnnxInference(len(task.initial_tokens))
    # whisper takes an input shaped like audio features as already encoded: the ONNX encoder's output
    audio = torch.from_numpy(ort_models["encoder"].run(None, {"mel": mel.numpy()})[0])
    ours = task.run(audio)
    for ref, our in zip(reference, ours):
        assert our.tokens == ref.tokens, (ref.tokens, our.tokens)
        assert abs(our.avg_logprob - ref.avg_logprob) < 1e-4
    print(f"\nwhisper's DecodingTask on ONNX: {[len(r.tokens) for r in reference]} tokens per row identical")


def test_second_export_is_a_no_op(onnx_dir, converted_dir):
    before = (onnx_dir / "decoder_step.onnx").stat().st_mtime_ns
    result = run_tool("converter", "export-onnx", str(converted_dir))
    assert "up to date" in result.stdout
    assert (onnx_dir / "decoder_step.onnx").stat().st_mtime_ns == before


def test_move_exported_gathers_external_weights_into_one_file(tmp_path):
    """The path taken past 2 GB: one external file per tensor becomes one .data file."""
    from onnx import TensorProto, helper, numpy_helper

    weights = [np.random.default_rng(i).standard_normal((64, 64)).astype(np.float32) for i in range(3)]
    nodes, previous = [], "x"
    for i in range(3):
        nodes.append(helper.make_node("MatMul", [previous, f"w{i}"], [f"h{i}"]))
        previous = f"h{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("h2", TensorProto.FLOAT, [1, 64])],
                              [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)])
    scratch = tmp_path / ".m.export"
    scratch.mkdir()
    onnx.save_model(helper.make_model(graph), str(scratch / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(scratch.iterdir())) == 4

    move_exported(scratch, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    x = np.ones((1, 64), np.float32)
    out = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(out, x @ weights[0] @ weights[1] @ weights[2], rtol=1e-5)


def test_install_replaces_an_earlier_export_whole(tmp_path):
    from converter.onnx_export import ONNX_FORMAT, _install

    out = tmp_path / "onnx"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": ONNX_FORMAT}))
    (out / "stale.onnx").write_text("old")
    new = tmp_path / ".onnx.new.tmp"
    new.mkdir()
    (new / "encoder.onnx").write_text("new")
    _install(new, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]
    assert [p.name for p in out.iterdir()] == ["encoder.onnx"]


@pytest.mark.parametrize("case", ["missing-folder", "not-converted", "corrupt-weights", "bad-opset", "foreign-out"])
def test_bad_input_is_one_line_error_and_writes_nothing(case, tmp_path, converted_dir):
    args = []
    if case == "missing-folder":
        folder = tmp_path / "nope"
    elif case == "not-converted":
        folder = tmp_path / "empty"
        folder.mkdir()
    else:
        folder = tmp_path / "model"
        folder.mkdir()
        for name in ("model.json", "weights.safetensors"):
            (folder / name).write_bytes((converted_dir / name).read_bytes())
        if case == "corrupt-weights":
            with open(folder / "weights.safetensors", "r+b") as f:
                f.seek(-100, 2)
                byte = f.read(1)
                f.seek(-100, 2)
                f.write(bytes([byte[0] ^ 0xFF]))
        elif case == "bad-opset":
            args = ["--opset", "9"]
        else:  # --out naming a folder that is not an earlier export: never replaced
            (tmp_path / "keep").mkdir()
            (tmp_path / "keep" / "notes.txt").write_text("mine")
            args = ["--out", str(tmp_path / "keep")]
    result = run_tool("converter", "export-onnx", str(folder), *args, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    expected = {"missing-folder": "not found", "not-converted": "no model.json", "corrupt-weights": "sha256",
                "bad-opset": "--opset 9", "foreign-out": "not an ONNX export folder"}[case]
    assert expected in lines[0]
    assert not (folder / "onnx").exists()
    assert not [p for p in tmp_path.rglob(".*")], "temporary files left behind"
    if case == "foreign-out":
        assert [p.name for p in (tmp_path / "keep").iterdir()] == ["notes.txt"]
