"""ONNX export stage: artifacts/<name>/ (weights.safetensors + model.json) -> artifacts/<name>/onnx/.

The network is rebuilt from the safetensors alone (openai-whisper's module classes, this folder's
weights), and written as the three models ONNX Whisper deployments use:

    encoder.onnx       mel [batch, n_mels, 3000] -> audio_features [batch, n_audio_ctx, n_audio_state]
    decoder_init.onnx  tokens [batch, tokens], audio_features
                       -> logits [batch, tokens, n_vocab],
                          self_key_i, self_value_i [batch, tokens, n_text_state]   (i = decoder layer)
                          cross_key_i, cross_value_i [batch, n_audio_ctx, n_text_state]
    decoder_step.onnx  tokens [batch, new_tokens], past_self_key_i, past_self_value_i [batch, past, n_text_state],
                       cross_key_i, cross_value_i
                       -> logits [batch, new_tokens, n_vocab], self_key_i, self_value_i [batch, past + new_tokens, ...]

A step's position offset is the past length, as in openai-whisper's TextDecoder (which reads it off
its cache), so no separate offset input can disagree with the cache. Caches keep whisper's layout:
keys and values before the head split, [batch, positions, n_text_state].

Everything is written to a temporary folder next to the target, checked (onnx.checker, then
onnxruntime against the torch model), and renamed into place with manifest.json last inside it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import contracts
from contracts import MODEL_JSON, write_json

from .checkpoint import DIM_FIELDS, ConversionError, sha256_file
from .validate import TOLERANCE, VALIDATION_SEED, fixed_inputs

ONNX_FORMAT = "whisper-max/onnx@1"
# 17 is the first opset with LayerNormalization as one op; the TorchScript exporter stops at 20.
DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 14, 20
# Validation: the decoder_init model runs this many of the fixed prefix's tokens, decoder_step the
# rest one at a time; every step's logits are compared with the uncached forward pass.
INIT_TOKENS = 4


def read_model_json(artifact_dir: Path) -> dict:
    """model.json of a converted folder, after checking its weights against the sha256 it records."""
    artifact_dir = Path(artifact_dir)
    model_path = artifact_dir / MODEL_JSON
    try:
        model_json = contracts.read_model_json(artifact_dir)
        weights_path = artifact_dir / model_json["weights"]["file"]
        expected_sha256 = model_json["weights"]["sha256"]
        missing = [f for f in DIM_FIELDS if not isinstance(model_json["dims"].get(f), int)]
        if missing:
            raise KeyError(f"dims lacks {', '.join(missing)}")
    except contracts.ContractError as exc:
        raise ConversionError(str(exc)) from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConversionError(f"{model_path} is not a converter model.json ({exc}); run make convert again") from None
    if not weights_path.is_file():
        raise ConversionError(f"{weights_path} is missing; run make convert again")
    if sha256_file(weights_path) != expected_sha256:
        raise ConversionError(f"{weights_path} does not match the sha256 in model.json (altered or truncated); "
                              "run make convert again")
    return model_json


def load_torch_model(artifact_dir: Path, model_json: dict):
    """openai-whisper's module tree with this folder's (checked) weights, in fp32."""
    from safetensors.torch import load_file
    from whisper.model import ModelDimensions, Whisper

    weights_path = Path(artifact_dir) / model_json["weights"]["file"]
    state = load_file(str(weights_path))
    model = Whisper(ModelDimensions(**model_json["dims"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConversionError(f"{weights_path} does not fit the dims in model.json: "
                              f"{str(exc).strip().splitlines()[0]}") from None
    return model.float().eval()


def _modules(model):
    """The export wrappers, built lazily so that importing this module needs no torch."""
    import torch
    from torch import nn

    def attend(q, k, v, n_head: int, mask):
        """openai-whisper's qkv_attention without SDPA: scale q and k by head_dim**-0.25 each."""
        scale = (q.shape[-1] // n_head) ** -0.25
        q = q.view(*q.shape[:2], n_head, -1).permute(0, 2, 1, 3)
        k = k.view(*k.shape[:2], n_head, -1).permute(0, 2, 1, 3)
        v = v.view(*v.shape[:2], n_head, -1).permute(0, 2, 1, 3)
        qk = (q * scale) @ (k * scale).transpose(-1, -2)
        if mask is not None:
            qk = qk + mask
        w = torch.softmax(qk.float(), dim=-1)
        return (w @ v).permute(0, 2, 1, 3).flatten(start_dim=2)

    class CachedDecoder(nn.Module):
        """whisper's TextDecoder.forward with its key/value caches as explicit tensors: openai-whisper
        keeps them in forward hooks (install_kv_cache_hooks), which tracing cannot see."""

        def __init__(self, decoder):
            super().__init__()
            self.decoder = decoder
            self.n_head = decoder.blocks[0].attn.n_head

        def run(self, tokens, offset, self_past, cross_kv):
            """self_past: [(key, value)] per layer, or None when there is no past. Returns logits,
            the self-attention caches including these tokens, and nothing else."""
            d = self.decoder
            batch, n_new = tokens.shape
            # The logits multiply by the transposed embedding table, and constant folding stores that
            # transpose as a second 80 MB (tiny) table beside the one the token lookup reads; looking
            # tokens up in the transposed table (a column gather) leaves one table in the file.
            embedding_t = d.token_embedding.weight.t()
            token_vectors = torch.index_select(embedding_t, 1, tokens.reshape(-1)).t().reshape(batch, n_new, -1)
            x = token_vectors + d.positional_embedding[offset: offset + n_new]
            # rows for the new positions, columns for every cached and new key: whisper's causal mask
            mask = d.mask[offset: offset + n_new, : offset + n_new]
            present = []
            for i, block in enumerate(d.blocks):
                h = block.attn_ln(x)
                q, k, v = block.attn.query(h), block.attn.key(h), block.attn.value(h)
                if self_past is not None:
                    k = torch.cat([self_past[i][0], k], dim=1)
                    v = torch.cat([self_past[i][1], v], dim=1)
                present.append((k, v))
                x = x + block.attn.out(attend(q, k, v, self.n_head, mask))
                h = block.cross_attn_ln(x)
                ck, cv = cross_kv[i]
                x = x + block.cross_attn.out(attend(block.cross_attn.query(h), ck, cv, self.n_head, None))
                x = x + block.mlp(block.mlp_ln(x))
            x = d.ln(x)
            logits = x @ embedding_t
            return logits, present

    class Encoder(nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, mel):
            return self.encoder(mel)

    class DecoderInit(nn.Module):
        def __init__(self, decoder):
            super().__init__()
            self.cached = CachedDecoder(decoder)

        def forward(self, tokens, audio_features):
            blocks = self.cached.decoder.blocks
            cross = [(b.cross_attn.key(audio_features), b.cross_attn.value(audio_features)) for b in blocks]
            logits, present = self.cached.run(tokens, 0, None, cross)
            return (logits, *[t for kv in present for t in kv], *[t for kv in cross for t in kv])

    class DecoderStep(nn.Module):
        def __init__(self, decoder):
            super().__init__()
            self.cached = CachedDecoder(decoder)
            self.n_layer = len(decoder.blocks)

        def forward(self, tokens, *caches):
            n = self.n_layer
            self_past = [(caches[2 * i], caches[2 * i + 1]) for i in range(n)]
            cross = [(caches[2 * n + 2 * i], caches[2 * n + 2 * i + 1]) for i in range(n)]
            logits, present = self.cached.run(tokens, self_past[0][0].shape[1], self_past, cross)
            return (logits, *[t for kv in present for t in kv])

    return Encoder(model.encoder), DecoderInit(model.decoder), DecoderStep(model.decoder)


def _kv_names(prefix: str, n_layer: int) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]


def signatures(n_layer: int) -> dict:
    """Input and output names of each model, with the dynamic axes the exporter gets."""
    self_kv, past_kv, cross_kv = _kv_names("self", n_layer), _kv_names("past_self", n_layer), _kv_names("cross", n_layer)
    return {
        "encoder": {"inputs": ["mel"], "outputs": ["audio_features"],
                    "dynamic_axes": {"mel": {0: "batch"}, "audio_features": {0: "batch"}}},
        "decoder_init": {
            "inputs": ["tokens", "audio_features"], "outputs": ["logits", *self_kv, *cross_kv],
            "dynamic_axes": {"tokens": {0: "batch", 1: "tokens"}, "audio_features": {0: "batch"},
                             "logits": {0: "batch", 1: "tokens"},
                             **{n: {0: "batch", 1: "tokens"} for n in self_kv}, **{n: {0: "batch"} for n in cross_kv}}},
        "decoder_step": {
            "inputs": ["tokens", *past_kv, *cross_kv], "outputs": ["logits", *self_kv],
            "dynamic_axes": {"tokens": {0: "batch", 1: "new_tokens"}, "logits": {0: "batch", 1: "new_tokens"},
                             **{n: {0: "batch", 1: "past"} for n in past_kv}, **{n: {0: "batch"} for n in cross_kv},
                             **{n: {0: "batch", 1: "past_plus_new_tokens"} for n in self_kv}}},
    }


def _export(module, example_args: tuple, path: Path, signature: dict, opset: int) -> None:
    """Trace module into path (TorchScript exporter: works offline with torch alone, and its
    dynamic_axes cover every axis here; the dynamo exporter would also need onnxscript)."""
    import warnings

    import torch

    # Past 2 GB (large's decoders) the exporter writes one external file per tensor, named after
    # the tensor, so two models exported into one folder could overwrite each other's files: each
    # model is traced in a folder of its own and then moved, its weights gathered into one file.
    scratch = path.parent / f".{path.stem}.export"
    scratch.mkdir()
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer warns about every shape it turns into a Python number; the dynamic axes and
        # the onnxruntime check at other lengths are what show the shapes stayed symbolic
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example_args, str(scratch / path.name), dynamo=False, opset_version=opset,
                          input_names=signature["inputs"], output_names=signature["outputs"],
                          dynamic_axes=signature["dynamic_axes"], do_constant_folding=True)
    move_exported(scratch, path)


def move_exported(scratch: Path, path: Path) -> None:
    """Move scratch/<path.name> to path; when the exporter wrote its weights as external files
    beside it, save them as one file, <path.name>.data, that the model refers to."""
    import onnx

    if [p.name for p in scratch.iterdir()] == [path.name]:
        os.replace(scratch / path.name, path)
    else:
        model = onnx.load(str(scratch / path.name), load_external_data=True)
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data")
    shutil.rmtree(scratch)


def _errors(ours: np.ndarray, reference: np.ndarray) -> dict:
    diff = np.abs(ours.astype(np.float64) - reference.astype(np.float64))
    return {"max_abs": float(diff.max()), "reference_max_abs": float(np.abs(reference).max())}


def sessions(onnx_dir: Path) -> dict:
    """onnxruntime sessions for the three models, on CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers are not the user's business
    return {name: ort.InferenceSession(str(Path(onnx_dir) / f"{name}.onnx"), options,
                                       providers=["CPUExecutionProvider"])
            for name in ("encoder", "decoder_init", "decoder_step")}


def validate_onnx(onnx_dir: Path, model, dims: dict) -> dict:
    """onnx.checker on every model, then onnxruntime against the torch model on validate.py's fixed
    inputs: the encoder output, decoder_init's logits for the whole prefix, and decoder_step's
    logits for each later token fed one at a time, against the uncached forward pass."""
    import onnx
    import onnxruntime
    import torch

    started = time.perf_counter()
    for name in ("encoder", "decoder_init", "decoder_step"):
        try:
            onnx.checker.check_model(str(onnx_dir / f"{name}.onnx"), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ConversionError(f"{name}.onnx fails onnx.checker: {str(exc).strip().splitlines()[0]}") from None

    mel, tokens = fixed_inputs(dims)
    with torch.no_grad():
        torch_audio = model.encoder(torch.from_numpy(mel)[None])
        torch_logits = model.decoder(torch.from_numpy(tokens)[None], torch_audio).numpy()
        torch_audio = torch_audio.numpy()

    run = sessions(onnx_dir)
    n_layer = dims["n_text_layer"]
    audio = run["encoder"].run(None, {"mel": mel[None]})[0]
    init_all = run["decoder_init"].run(None, {"tokens": tokens[None], "audio_features": audio})

    init = run["decoder_init"].run(None, {"tokens": tokens[None, :INIT_TOKENS], "audio_features": audio})
    self_kv, cross_kv = init[1: 1 + 2 * n_layer], init[1 + 2 * n_layer:]
    step_logits = []
    step_names = signatures(n_layer)["decoder_step"]["inputs"]
    for position in range(INIT_TOKENS, len(tokens)):
        feeds = dict(zip(step_names, [tokens[None, position: position + 1], *self_kv, *cross_kv]))
        logits, *self_kv = run["decoder_step"].run(None, feeds)
        step_logits.append(logits[:, -1])

    report = {
        "inputs": {"seed": VALIDATION_SEED, "mel_shape": [1, *mel.shape],
                   "tokens": tokens.tolist(), "decoder_init_tokens": INIT_TOKENS,
                   "decoder_steps": len(tokens) - INIT_TOKENS},
        "encoder": _errors(audio, torch_audio),
        "decoder_init_logits": _errors(init_all[0], torch_logits),
        "decoder_step_logits": _errors(np.stack(step_logits, axis=1), torch_logits[:, INIT_TOKENS:]),
        "tolerance": TOLERANCE,
        "checker": "onnx.checker.check_model(full_check=True) passed for every model",
        "onnxruntime": onnxruntime.__version__,
        "seconds": round(time.perf_counter() - started, 2),
    }
    report["passed"] = (report["encoder"]["max_abs"] <= TOLERANCE["encoder_max_abs"]
                        and report["decoder_init_logits"]["max_abs"] <= TOLERANCE["logits_max_abs"]
                        and report["decoder_step_logits"]["max_abs"] <= TOLERANCE["logits_max_abs"])
    if not report["passed"]:
        raise ConversionError(
            f"ONNX validation failed: encoder max abs error {report['encoder']['max_abs']:.3g}, "
            f"decoder_init logits {report['decoder_init_logits']['max_abs']:.3g}, "
            f"decoder_step logits {report['decoder_step_logits']['max_abs']:.3g} (tolerance {TOLERANCE})")
    return report


def _graph_signature(path: Path) -> dict:
    """Names, element types and shapes (symbolic axes by name) of a model's inputs and outputs."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(values):
        return [{"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]

    return {"inputs": describe(graph.input), "outputs": describe(graph.output)}


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    import whisper

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "openai-whisper": whisper.__version__}


def is_up_to_date(out_dir: Path, model_json: dict, opset: int) -> bool:
    """The folder was exported from these very weights, with this opset and these tool versions,
    and every file still has the sha256 its manifest records."""
    try:
        manifest = json.loads((out_dir / "manifest.json").read_text())
        return (manifest.get("format") == ONNX_FORMAT and manifest["opset"] == opset
                and manifest["source"]["weights_sha256"] == model_json["weights"]["sha256"]
                and manifest["versions"] == _versions()
                and all((out_dir / f).is_file() and sha256_file(out_dir / f) == entry["sha256"]
                        for f, entry in manifest["files"].items()))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def export_onnx(artifact_dir: Path, out_dir: Path | None = None, opset: int = DEFAULT_OPSET,
                force: bool = False) -> dict:
    """Export, validate and install artifact_dir's model as ONNX. Returns the manifest, with
    "up_to_date": True when a current export was already in place and nothing was written."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConversionError(f"--opset {opset} is not supported: choose {MIN_OPSET} to {MAX_OPSET}")
    artifact_dir = Path(artifact_dir)
    model_json = read_model_json(artifact_dir)
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise ConversionError(f"ONNX export needs the onnx extra ({exc.name} is not installed): "
                              "pip install -e '.[onnx]'") from None
    import torch

    out_dir = Path(out_dir) if out_dir is not None else artifact_dir / "onnx"
    if out_dir.exists() and not _is_export_folder(out_dir):
        raise ConversionError(f"{out_dir} exists and is not an ONNX export folder (no manifest.json of "
                              f"{ONNX_FORMAT}); it will not be replaced: choose another --out")
    if not force and is_up_to_date(out_dir, model_json, opset):
        return {**json.loads((out_dir / "manifest.json").read_text()), "up_to_date": True}
    model = load_torch_model(artifact_dir, model_json)

    started = time.perf_counter()
    dims = model_json["dims"]
    n_layer = dims["n_text_layer"]
    sigs = signatures(n_layer)
    encoder, decoder_init, decoder_step = _modules(model)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    except OSError as exc:
        raise ConversionError(f"cannot write next to {out_dir}: {exc.strerror or exc}") from None
    try:
        # example inputs with batch 2 and lengths that differ between axes, so that no two dynamic
        # axes are traced as the same number
        mel = torch.zeros(2, dims["n_mels"], 2 * dims["n_audio_ctx"])
        _export(encoder, (mel,), tmp / "encoder.onnx", sigs["encoder"], opset)
        with torch.no_grad():
            audio = model.encoder(mel)
        tokens = torch.zeros(2, 3, dtype=torch.long)
        _export(decoder_init, (tokens, audio), tmp / "decoder_init.onnx", sigs["decoder_init"], opset)
        with torch.no_grad():
            init = decoder_init(tokens, audio)
        _export(decoder_step, (tokens[:, :1], *init[1:]), tmp / "decoder_step.onnx", sigs["decoder_step"], opset)

        report = validate_onnx(tmp, model, dims)
        write_json(tmp / "validation.json", report)
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {
            "format": ONNX_FORMAT,
            "name": model_json.get("name"),
            "dims": dims,
            "source": {"model_json_format": model_json.get("format"), "weights_file": model_json["weights"]["file"],
                       "weights_sha256": model_json["weights"]["sha256"],
                       "checkpoint_sha256": model_json.get("source", {}).get("sha256")},
            "opset": opset,
            "dtype": "float32",
            "exporter": "torch.onnx.export, TorchScript (dynamo=False)",
            "versions": _versions(),
            "models": {name: {"file": f"{name}.onnx", **_graph_signature(tmp / f"{name}.onnx")} for name in sigs},
            "validation": {k: report[k]["max_abs"] for k in ("encoder", "decoder_init_logits", "decoder_step_logits")},
            "files": {f: {"sha256": sha256_file(tmp / f), "bytes": (tmp / f).stat().st_size} for f in files},
            "seconds": round(time.perf_counter() - started, 2),
        }
        write_json(tmp / "manifest.json", manifest)
        os.chmod(tmp, 0o755)  # mkdtemp makes folders private; artifacts are ordinary readable folders
        _install(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _is_export_folder(folder: Path) -> bool:
    """An earlier export (which may be replaced), or an empty folder; anything else is not ours."""
    if folder.is_dir() and not any(folder.iterdir()):
        return True
    try:
        return json.loads((folder / "manifest.json").read_text()).get("format") == ONNX_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _install(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder into place. A folder cannot be renamed over a non-empty one, so an
    older export is first renamed aside (readers see the old folder or the new, or briefly none:
    never a mix) and removed after."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
