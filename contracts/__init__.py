"""The contracts between the stages, in one place: `model.json` (convert -> compile and runtime) and the
artifact `manifest.json` (compile -> runtime), with the hashing and write-then-rename every stage uses.

The converter, the graph builders and the runtime read and check these files by the same rules, so a
folder one stage accepts is a folder the next one accepts, and a refusal always names the command that
rebuilds what is wrong. Standard library only: the runtime installs without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

MODEL_FORMAT = "whisper-max/model@1"
# @2: decoder_step takes the audio row of each token row (kv_rows) and the cross-attention keys and
# values once per audio; artifacts of @1 feed it other inputs, so they are refused and rebuilt
# @4: the graphs' weights are made by `make compile` into the target's own weights file (the manifest's
# "weights"), which the runtime reads as it is; @3 left making them to the runtime
# @5: decoder_step also takes each row's prefix row and prefix length (STEP_CACHES_AT)
MANIFEST_FORMAT = "whisper-max/artifacts@5"
# decoder_step's inputs: tokens, position, kv_rows, prefix_rows, prefix_lengths, then per layer the
# self-attention caches (k_t, v), then per layer the cross-attention keys and values (k_t, v)
STEP_CACHES_AT = 5
MODEL_JSON = "model.json"
MANIFEST_JSON = "manifest.json"
# what every stage reads from model.json
MODEL_KEYS = ("name", "dims", "is_multilingual", "num_languages", "alignment_heads", "source", "weights",
              "tokenizer", "mel_filters")
FIX_CONVERT = "run `make convert` for this model"
# The runtime's compute types: "exact" runs the checkpoint's own values; "int8" the decoder's int8
# build (`make compile DECODER_WEIGHTS=int8`, CPU only), kept in a folder of its own beside "cpu".
COMPUTE_TYPES = ("exact", "int8")
# The int8 build's weights share one scale per this many inputs of an output: the graphs' scale
# weights are (inputs / INT8_GROUP, outputs), make compile quantizes by the same groups, and the
# int8 kernel (graph_builders/kernels/mojo/weight_matmul.mojo, GROUP) sums them so.
INT8_GROUP = 64
# The exact CPU build's decoder weights for token rows are fp16 panels of this many outputs (the
# manifest's "panels" transform, made by make compile; weight_matmul.mojo's PANEL reads them).
PANEL_WIDTH = 64
# A target's weights file (graph_builders/weights.py): its data begins on a boundary of this many bytes,
# so the runtime's arrays read from it start on cache lines.
TARGET_WEIGHTS = "weights.safetensors"
WEIGHTS_ALIGNMENT = 64


# A CPU build runs code compiled for the CPU that built it (MAX targets the host's instruction set;
# the int8 build's audio rows use AVX-512 VNNI where the CPU has it), so the manifest records which
# of these the building CPU had and the runtime refuses a build whose features this CPU lacks.
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni")


def cpu_features() -> list[str]:
    """The CPU_FEATURES this machine's CPU has, from /proc/cpuinfo ([] where it cannot tell)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return [feature for feature in CPU_FEATURES if feature in flags]
    return []


def max_version() -> str:
    """The installed MAX's version, which make compile records and the runtime checks: importlib.metadata's
    version("max"), read from the "Version:" line of the max-*.dist-info beside the package, without
    importing importlib.metadata and searching every path entry for it (21-36 ms of every load, measured)."""
    import importlib.util

    spec = importlib.util.find_spec("max")
    for location in (spec.submodule_search_locations or []) if spec else []:
        found = list(Path(location).parent.glob("max-*.dist-info"))
        if len(found) == 1:
            try:
                with open(found[0] / "METADATA", encoding="utf-8") as f:
                    for line in f:
                        if line.startswith("Version:"):
                            return line.split(":", 1)[1].strip()
                        if not line.strip():  # the headers end: no Version line
                            break
            except OSError:
                break
    from importlib.metadata import version

    return version("max")


def target_folder(device: str, arch: str | None, compute_type: str = "exact") -> str:
    """The folder under artifacts/<model>/ that holds one build: cpu, cpu-int8, gpu-<arch>."""
    folder = "cpu" if device == "cpu" else f"gpu-{arch}"
    return folder if compute_type == "exact" else f"{folder}-{compute_type}"


class ContractError(Exception):
    """A one-line reason why a stage's input cannot be used, ending with the command that fixes it."""


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # into one reused buffer, without the GIL


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write(target: Path, write) -> None:
    """Call write(tmp_path), then rename tmp_path onto target (same folder, so the rename is atomic):
    a reader sees the old file or the whole new one, never half of it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes files private; artifacts are ordinary readable files
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(target: Path, data: dict) -> None:
    atomic_write(target, lambda p: p.write_text(json.dumps(data, indent=2) + "\n"))


def read_json(path: Path, fix: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ContractError(f"{path} not found; {fix}") from None
    except (OSError, ValueError) as exc:
        raise ContractError(f"{path} is not valid JSON ({type(exc).__name__}); {fix}") from None
    if not isinstance(data, dict):
        raise ContractError(f"{path} does not hold a JSON object; {fix}")
    return data


def read_model_json(artifact_dir: Path, fix: str = FIX_CONVERT) -> dict:
    """An artifact folder's model.json, checked: the format this code writes, and every key the stages read."""
    artifact_dir = Path(artifact_dir)
    if not artifact_dir.is_dir():
        raise ContractError(f"model folder {artifact_dir} not found; {fix}")
    path = artifact_dir / MODEL_JSON
    if not path.is_file():
        raise ContractError(f"{artifact_dir} has no {MODEL_JSON}; {fix}")
    model = read_json(path, fix)
    if model.get("format") != MODEL_FORMAT:
        raise ContractError(f"{path} has format {model.get('format')!r}, not {MODEL_FORMAT!r}; {fix} again")
    missing = [key for key in MODEL_KEYS if key not in model]
    if missing:
        raise ContractError(f"{path} lacks {', '.join(missing)}; {fix} again")
    return model


def read_manifest(target_dir: Path, fix: str) -> dict:
    """A compiled target's manifest.json, checked for its format; what it must match is the reader's to say."""
    path = Path(target_dir) / MANIFEST_JSON
    manifest = read_json(path, fix)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ContractError(f"{path} has format {manifest.get('format')!r}, not {MANIFEST_FORMAT!r}; {fix}")
    return manifest
