"""The target's weights: every graph weight made from its checkpoint tensor, as the graphs' WeightSpecs say.

`make compile` writes them beside the graphs (artifacts/<name>/<target>/weights.safetensors), so the
runtime reads the file and binds its arrays as they are: transposing, packing into panels and
quantizing base's weights took 0.34 s (exact) and 0.40 s (int8) of every process's start. The file
is a plain safetensors file whose data begins on a 64-byte boundary (WEIGHTS_ALIGNMENT: every tensor
of a Whisper model is a multiple of 64 bytes, so each starts on a cache line as an allocated array
would), named by the specs' names. numpy and safetensors only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from contracts import INT8_GROUP, PANEL_WIDTH, WEIGHTS_ALIGNMENT, atomic_write, sha256_bytes


class WeightError(ValueError):
    """A one-line reason why a graph weight cannot be made from its checkpoint tensor."""


def transform(array: np.ndarray, kind: str, dtype) -> np.ndarray:
    """The weight transforms WeightSpec names (graphs.py), as a contiguous array of `dtype`; the int8
    build's quantized ones are int8_part's."""
    if kind == "none":
        return np.ascontiguousarray(array, dtype=dtype)
    if kind == "transpose":
        return transposed(array, dtype)
    if kind == "conv1d_rscf":  # (out, in, k) -> (1, k, in, out)
        return np.ascontiguousarray(array.transpose(2, 1, 0)[None], dtype=dtype)
    if kind == "panels" and array.ndim == 2:
        return panels(array, dtype)
    raise WeightError(f"unknown weight transform {kind!r}")


INT8_MAX = 127  # symmetric: -127..127, so a group's scale is max |value| / 127


def quantize(array: np.ndarray, rows: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A 2-D (out, in) weight for the int8 build, in one pass: its transpose rounded to int8, (in, out),
    and the fp32 scales, (in / 64, out) as the kernel reads them. Each 64 inputs of an output share
    the scale max |value| / 127 (0 for a group of zeros) and are rounded to value / scale. Blocked as
    transposed, for the same reason."""
    if array.ndim != 2 or array.shape[1] % INT8_GROUP:
        raise WeightError(f"int8 weights need a 2-D tensor of a multiple of {INT8_GROUP} inputs, this one has "
                            f"shape {list(array.shape)}")
    out_dim, n_in = array.shape
    groups = n_in // INT8_GROUP
    values = np.empty((n_in, out_dim), dtype=np.int8)
    scale = np.empty((groups, out_dim), dtype=np.float32)
    for first in range(0, out_dim, rows):
        block = array[first:first + rows].astype(np.float32).reshape(-1, groups, INT8_GROUP)
        block_scale = np.maximum(block.max(axis=2), -block.min(axis=2)) / INT8_MAX  # (rows, groups)
        scale[:, first:first + rows] = block_scale.T
        rounded = np.rint(block / np.where(block_scale > 0, block_scale, 1)[:, :, None]).reshape(-1, n_in)
        values[:, first:first + rows] = np.clip(rounded, -INT8_MAX, INT8_MAX).T
    return values, scale


def quantize_per_output(array: np.ndarray, tile: int = 64, rows: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """A 2-D (out, in) weight for the int8 build's VNNI products (the audio rows, the output projection),
    in one pass: rounded to int8 with one scale per output, max |value| / 127 (0 for an output of
    zeros), packed as dynamic_int8_matmul reads it: (ceil(out / 64), in * 64), tile t holding
    w[64t + c, 4g + j] at g * 256 + c * 4 + j; and the scales, (tiles * 64,). Outputs past `out` (the
    vocabulary's last tile) are zeros with scale 0. `rows` outputs at a time, to stay in the cache."""
    if rows % tile:
        raise ValueError(f"rows ({rows}) must be a multiple of the tile ({tile})")
    if array.ndim != 2 or array.shape[1] % 4:
        raise WeightError(f"int8 weights for VNNI need a 2-D tensor of a multiple of 4 inputs, this one has "
                            f"shape {list(array.shape)}")
    out_dim, n_in = array.shape
    n_tiles = -(-out_dim // tile)
    packed = np.empty((n_tiles, n_in * tile), dtype=np.int8)
    scale = np.zeros(n_tiles * tile, dtype=np.float32)
    for first in range(0, out_dim, rows):
        block = array[first:first + rows].astype(np.float32)
        if len(block) % tile:
            block = np.concatenate([block, np.zeros((tile - len(block) % tile, n_in), dtype=np.float32)])
        block_scale = np.maximum(block.max(axis=1), -block.min(axis=1)) / INT8_MAX
        scale[first:first + len(block)] = block_scale
        rounded = np.clip(np.rint(block / np.where(block_scale > 0, block_scale, 1)[:, None]), -INT8_MAX, INT8_MAX)
        tiles = len(block) // tile
        packed[first // tile:first // tile + tiles] = (
            rounded.astype(np.int8).reshape(tiles, tile, n_in // 4, 4).transpose(0, 2, 1, 3).reshape(tiles, -1))
    return packed, scale


# The int8 build's weights made by quantizing a tensor (see graph_builders/graphs.py, WeightSpec):
# transform -> (how the tensor is quantized, which part of the result the weight is).
_INT8_PARTS = {"group_scale": (quantize, 1), "transpose": (quantize, 0), "panels": (quantize, 0),
               "output_scale": (quantize_per_output, 1), "vnni_pack": (quantize_per_output, 0)}
_INT8_VALUES = ("transpose", "panels", "vnni_pack")  # the transforms whose weight is the int8 values


def int8_part(spec: dict, source: np.ndarray, quantized: dict) -> np.ndarray:
    """An int8 build's weight the manifest names: its tensor quantized once per kind (cached in
    `quantized` for the weight made of the other part), then the part it asks for."""
    kind = _INT8_PARTS.get(spec["transform"])
    if kind is None or (spec["transform"] in _INT8_VALUES) != (spec["dtype"] == "int8"):
        raise WeightError(f"no int8 weight is made by {spec['transform']!r} as {spec['dtype']}")
    quantizer, part = kind
    key = (spec["source"], quantizer)
    if key not in quantized:
        quantized[key] = quantizer(source)
    if spec["transform"] == "panels":  # the (in, out) int8 values, in panels of their outputs
        return panels(quantized[key][part].T, np.int8)
    return quantized[key][part]


def transposed(array: np.ndarray, dtype, rows: int = 64) -> np.ndarray:
    """array.T as a new contiguous array of `dtype`, the same values. Copied `rows` source rows at a
    time: numpy's strided copy of a whole transpose misses the cache on every element (base's
    token embedding, 51865 x 512 fp16: 99 ms, blocked 17 ms), a block stays in it."""
    if array.ndim != 2:
        return np.ascontiguousarray(array.T, dtype=dtype)
    out = np.empty(array.shape[::-1], dtype=dtype)
    for first in range(0, array.shape[0], rows):
        out[:, first:first + rows] = array[first:first + rows].T
    return out


def panels(array: np.ndarray, dtype, panel: int = PANEL_WIDTH, panels_at_once: int = 4) -> np.ndarray:
    """A 2-D (out, in) weight as fp16_panel_matmul reads it: (ceil(out / 64), in * 64), panel p holding
    array[64p + c, k] at k * 64 + c, the outputs past `out` zeros. A few panels at a time, as
    transposed copies, to stay in the cache."""
    out_dim, n_in = array.shape
    n_panels = -(-out_dim // panel)
    packed = np.zeros((n_panels, n_in * panel), dtype=dtype)
    for first in range(0, n_panels, panels_at_once):
        block = array[first * panel:(first + panels_at_once) * panel]
        whole = len(block) // panel
        if whole:
            outputs = block[:whole * panel].reshape(whole, panel, n_in)
            packed[first:first + whole] = outputs.transpose(0, 2, 1).reshape(whole, -1)
        if len(block) % panel:  # the last, partial panel
            packed[first + whole].reshape(n_in, panel)[:, :len(block) % panel] = block[whole * panel:].T
    return packed


def make_weights(specs: list[dict], tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each spec's weight (WeightSpec.to_json()), by its name, from the checkpoint's `tensors`."""
    quantized = {}  # int8 builds: each tensor quantized once per kind, for its int8 values and its scales
    weights = {}
    for spec in specs:
        source = tensors.get(spec["source"])
        if source is None:
            raise WeightError(f"the weights have no tensor {spec['source']!r}")
        if spec["transform"] in ("group_scale", "output_scale") or spec["dtype"] == "int8":
            array = int8_part(spec, source, quantized)
        else:
            array = transform(source, spec["transform"], spec["dtype"])
        if list(array.shape) != list(spec["shape"]):
            raise WeightError(f"tensor {spec['source']} has shape {list(array.shape)} after {spec['transform']}, "
                              f"the graph expects {list(spec['shape'])}")
        weights[spec["name"]] = array
    return weights


def weights_signature(source_sha256: str, specs: list[dict]) -> str:
    """What a target's weights are made of: the checkpoint's weights, the specs, and this module's code."""
    digest = hashlib.sha256(source_sha256.encode() + b"\0")
    digest.update(json.dumps(sorted(specs, key=lambda s: s["name"]), sort_keys=True).encode() + b"\0")
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()


def write_weights(path: Path, weights: dict[str, np.ndarray]) -> str:
    """`weights` as a safetensors file (written whole, then renamed into place) whose data begins on a
    WEIGHTS_ALIGNMENT boundary: the header's length is evened out with a metadata field of padding.
    Returns the sha256 of the bytes written."""
    from safetensors.numpy import save

    arrays = {name: np.ascontiguousarray(array) for name, array in weights.items()}
    data = save(arrays, metadata={"padding": ""})
    unpadded = len(data[8:8 + int.from_bytes(data[:8], "little")].rstrip(b" "))
    # safetensors pads the header with spaces to a multiple of 8; pick the padding that lands it on the boundary
    extra = next(p for p in range(WEIGHTS_ALIGNMENT)
                 if (8 + -(-(unpadded + p) // 8) * 8) % WEIGHTS_ALIGNMENT == 0)
    if extra:
        data = save(arrays, metadata={"padding": "0" * extra})
    header = 8 + int.from_bytes(data[:8], "little")
    if header % WEIGHTS_ALIGNMENT:
        raise WeightError(f"the weights' data would begin at byte {header}, not on a {WEIGHTS_ALIGNMENT}-byte boundary")
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return sha256_bytes(data)
