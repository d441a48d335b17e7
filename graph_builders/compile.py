"""Compile stage: model.json + weights.safetensors -> artifacts/<name>/<target>/*.mef, weights.safetensors,
manifest.json.

Graphs are built from model.json alone, compiled with InferenceSession.compile, and written with
export_mef. GPU targets are cross-compiled on a CPU-only host through MAX's virtual devices. Each
graph weight is then made from its checkpoint tensor (transposed, packed, quantized: weights.py) into
the target's own weights file, which the runtime reads as it is. The manifest records where every
artifact came from (MAX version, device, arch, graph signatures, the checkpoint weights' sha256, the
target weights' sha256) and how each graph weight was made.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from contracts import (MANIFEST_FORMAT, MANIFEST_JSON, TARGET_WEIGHTS, ContractError, atomic_write, cpu_features,
                       max_version, read_manifest, read_model_json, sha256_bytes, sha256_file, target_folder,
                       write_json)

DEFAULT_GPU_ARCH = "sm_90a"  # what MAX names the H100 and H200 (driver.accelerator_architecture_name)
DECODER_WEIGHTS = ("auto", "fp16", "fp32", "int8")


class CompileError(Exception):
    """A one-line, user-facing reason why compilation cannot proceed."""


def target_name(device: str, arch: str | None, decoder_weights: str = "auto") -> str:
    """int8 decoder weights are the runtime's compute type "int8", in a folder of their own; the other
    choices are the exact build's (fp16 for an fp32 checkpoint is recorded as not exact)."""
    return target_folder(device, arch, "int8" if decoder_weights == "int8" else "exact")


def _describe(tensor_type) -> dict:
    return {"dtype": str(tensor_type.dtype), "shape": [str(d) for d in tensor_type.shape]}


def _graph_device(device: str, arch: str | None):
    """The DeviceRef graphs are built for; for gpu, switch MAX to virtual devices when none is attached."""
    from max import driver
    from max.graph import DeviceRef

    if device == "cpu":
        return DeviceRef.CPU(), [driver.CPU()]
    if device != "gpu":
        raise CompileError(f"unknown device {device!r}; use cpu or gpu")
    attached = driver.accelerator_count() > 0 and not driver.is_virtual_device_mode()
    if attached and driver.accelerator_architecture_name() != arch:
        raise CompileError(f"the attached GPU is {driver.accelerator_architecture_name()}, not {arch}; "
                           f"pass ARCH={driver.accelerator_architecture_name()} or compile on a host without a GPU")
    if not attached:
        driver.set_virtual_device_api("cuda")
        driver.set_virtual_device_target_arch(arch)
        driver.set_virtual_device_count(1)
    return DeviceRef.GPU(0), [driver.Accelerator()]


def load_model_json(artifact_dir: Path) -> dict:
    try:
        return read_model_json(artifact_dir)
    except ContractError as exc:
        raise CompileError(str(exc)) from None


def decoder_weight_dtype(model: dict, decoder_weights: str) -> tuple[str, bool]:
    """The dtype the decoder's weights are kept in, and whether that holds the checkpoint's exact values.

    auto: fp16 where every checkpoint tensor is fp16 (openai's files: exact), fp32 otherwise.
    fp16: also for fp32 checkpoints (fine-tunes), rounded: half the bytes per token, other numerics.
    fp32: the plain path, on any checkpoint.
    int8: the token rows' weights quantized, one scale per 64 rows of a column, and the audio rows'
    matmuls int8 on both sides (never exact; graphs.py).
    """
    if decoder_weights not in DECODER_WEIGHTS:
        raise CompileError(f"unknown decoder weights {decoder_weights!r}; use one of {', '.join(DECODER_WEIGHTS)}")
    checkpoint_fp16 = model["weights"].get("dtypes") == ["float16"]
    if decoder_weights == "auto":
        return ("float16" if checkpoint_fp16 else "float32"), True
    if decoder_weights == "fp16":
        return "float16", checkpoint_fp16
    if decoder_weights == "int8":
        return "int8", False
    return "float32", True


def compile_model(artifact_dir: Path, device: str = "cpu", arch: str | None = None, log=print,
                  decoder_weights: str = "auto") -> Path:
    """Compile every graph of the model; graphs whose artifact is already current are kept."""
    from max.engine import InferenceSession

    from .graphs import WhisperGraphs

    arch = None if device == "cpu" else (arch or DEFAULT_GPU_ARCH)
    if decoder_weights == "int8" and device != "cpu":
        raise CompileError("int8 decoder weights are a CPU option; compile them with --device cpu")
    model = load_model_json(artifact_dir)
    weights_path = artifact_dir / model["weights"]["file"]
    if not weights_path.is_file():
        raise CompileError(f"{weights_path} not found; run `make convert` again")
    target = artifact_dir / target_name(device, arch, decoder_weights)
    target.mkdir(parents=True, exist_ok=True)
    installed_max = max_version()

    graph_device, session_devices = _graph_device(device, arch)
    # MAX 26.7 aborts when a session is created after a graph with custom ops was built.
    session = InferenceSession(devices=session_devices)
    weight_dtype, weights_exact = decoder_weight_dtype(model, decoder_weights)
    if not weights_exact:
        log(("the int8 build: decoder weights and the audio rows' matmuls rounded to int8"
             if weight_dtype == "int8" else "decoder weights rounded to fp16")
            + ": results may differ from the checkpoint's own (see README)")
    # int8 keeps the audio's key and value projections (not read per token) as the exact build does
    checkpoint_fp16 = decoder_weight_dtype(model, "auto")[0] == "float16"
    try:
        builder = WhisperGraphs(model["dims"], graph_device,
                                fp16_weights=weight_dtype == "float16" or (weight_dtype == "int8" and checkpoint_fp16),
                                int8_weights=weight_dtype == "int8")
    except ValueError as exc:  # a model the int8 build cannot take
        raise CompileError(str(exc)) from None
    built = builder.all()
    previous = _read_manifest(target)
    # The weights enter at init, so their values do not change a graph: its signature is its own
    # text, plus the MAX version and target that compiled it and the source of the custom kernels.
    provenance = {"max_version": installed_max, "device": device, "arch": arch}
    if device == "cpu":
        provenance["cpu_features"] = cpu_features()
    kernels = kernels_sha256() if builder.uses_custom_kernels else None

    graphs = {}
    for item in built:
        text = str(item.graph)
        signature = sha256_bytes(json.dumps({**provenance, "kernels": kernels}, sort_keys=True).encode() + text.encode())
        mef = target / f"{item.name}.mef"
        old = (previous or {}).get("graphs", {}).get(item.name)
        if old and old["signature"] == signature and mef.is_file() and sha256_file(mef) == old["sha256"]:
            log(f"{item.name}: up to date")
            graphs[item.name] = old
            continue
        started = time.perf_counter()
        compiled = session.compile(item.graph)
        seconds = time.perf_counter() - started
        atomic_write(mef, lambda path: compiled.export_mef(str(path)))
        log(f"{item.name}: compiled in {seconds:.1f} s -> {mef}")
        graphs[item.name] = {
            "file": mef.name,
            "sha256": sha256_file(mef),
            "signature": signature,
            "inputs": [_describe(value.type) for value in item.graph.inputs],
            "weights": [spec.to_json() for spec in item.weights],
            "compile_seconds": round(seconds, 2),
        }

    weights = _target_weights(model, weights_path, target, graphs, previous, log)
    manifest = {
        "format": MANIFEST_FORMAT,
        **provenance,
        "kernels_sha256": kernels,
        "decoder_weights": {"dtype": weight_dtype, "exact": weights_exact,
                            # the int8 graphs recompute the logits near each row's best themselves
                            # (graphs.py); earlier int8 builds left that to the runtime
                            **({"logits": "rescored"} if weight_dtype == "int8" else {})},
        "model": {"name": model["name"], "dims": model["dims"], "source_sha256": model["source"]["sha256"],
                  "source_format": model["source"].get("format", "openai"),
                  "weights_file": model["weights"]["file"], "weights_sha256": model["weights"]["sha256"]},
        "graphs": graphs,
        "weights": weights,
    }
    if manifest != previous:
        write_json(target / MANIFEST_JSON, manifest)
    return target


def _target_weights(model: dict, weights_path: Path, target: Path, graphs: dict, previous: dict | None, log) -> dict:
    """Makes the target's weights file from the checkpoint's weights (kept when it is current); its manifest entry."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from .weights import WeightError, make_weights, weights_signature, write_weights

    specs = list({spec["name"]: spec for graph in graphs.values() for spec in graph["weights"]}.values())
    signature = weights_signature(model["weights"]["sha256"], specs)
    path = target / TARGET_WEIGHTS
    old = (previous or {}).get("weights") or {}
    if old.get("signature") == signature and path.is_file() and sha256_file(path) == old.get("sha256"):
        log(f"{TARGET_WEIGHTS}: up to date")
        return old
    if sha256_file(weights_path) != model["weights"]["sha256"]:
        raise CompileError(f"{weights_path} does not match the sha256 model.json records (corrupt or replaced); "
                           "run `make convert` again")
    started = time.perf_counter()
    try:
        tensors = load_file(str(weights_path))
        sha256 = write_weights(path, make_weights(specs, tensors))  # of the bytes written: not read back
    except (SafetensorError, OSError) as exc:
        raise CompileError(f"cannot make {path} from {weights_path} ({exc})") from None
    except WeightError as exc:
        raise CompileError(f"cannot make {path}: {exc}; run `make convert` again") from None
    log(f"{TARGET_WEIGHTS}: {len(specs)} weights made in {time.perf_counter() - started:.1f} s -> {path}")
    return {"file": TARGET_WEIGHTS, "sha256": sha256, "bytes": path.stat().st_size, "signature": signature}


def kernels_sha256() -> str:
    """One hash over the custom kernels' Mojo source, which the graph text names but does not hold."""
    from .kernels import KERNELS_PATH

    digest = hashlib.sha256()
    for path in sorted(Path(KERNELS_PATH).rglob("*.mojo")):
        digest.update(path.relative_to(KERNELS_PATH).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _read_manifest(target: Path) -> dict | None:
    try:
        return read_manifest(target, "compiling anew")
    except ContractError:
        return None
