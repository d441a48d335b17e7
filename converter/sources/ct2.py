"""faster-whisper's model folders: CTranslate2's `model.bin` (a short header, then named tensors),
`config.json`, and the vocabulary.

CTranslate2 stores a Whisper model in its own layout: the self-attention query/key/value
projections fused into one `linear_0` (cross-attention key/value into `linear_1`), with a key bias
of zeros where openai's model has none, the encoder's sinusoidal positions as a weight, and the
output projection as an alias of the token embedding. Each is mapped back to openai's tensor, bit
for bit; a non-zero key bias, which openai's model could not represent, is refused.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np

from ..checkpoint import ConversionError
from . import HEAD_WIDTH, Source, check_tensors, hashed, narrow_exact_float32
from .vocabulary import check_vocabulary

BINARY_VERSION = 6  # what CTranslate2 3.x and 4.x write (ctranslate2/specs/model_spec.py)
SPEC_NAME = "WhisperSpec"
# CTranslate2's DataType ids, in its order: float32, int8, int16, int32, float16, bfloat16
_DTYPES = {0: np.dtype(np.float32), 1: np.dtype(np.int8), 2: np.dtype(np.int16), 3: np.dtype(np.int32),
           4: np.dtype(np.float16), 5: "bfloat16"}


class _Reader:
    def __init__(self, data: memoryview, path: Path):
        self.data, self.offset, self.path = data, 0, path

    def take(self, size: int) -> memoryview:
        if self.offset + size > len(self.data):
            raise ConversionError(f"{self.path} is truncated ({len(self.data)} bytes; the header promises more)")
        chunk = self.data[self.offset:self.offset + size]
        self.offset += size
        return chunk

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        length = self.unpack("<H")
        raw = bytes(self.take(length))
        if not raw.endswith(b"\0"):
            raise ConversionError(f"{self.path} is not a CTranslate2 model.bin (malformed name at byte {self.offset})")
        return raw[:-1].decode("utf-8", errors="replace")


def read_model_bin(path: Path) -> tuple[str, int, dict, dict]:
    """(spec name, revision, {name: array or scalar}, {alias: target}); arrays are views of the mapped file."""
    data = memoryview(np.memmap(path, dtype=np.uint8, mode="r")) if path.stat().st_size else memoryview(b"")
    reader = _Reader(data, path)
    version = reader.unpack("<I")
    if version != BINARY_VERSION:
        raise ConversionError(f"{path}: CTranslate2 binary version {version}, this converter reads version "
                              f"{BINARY_VERSION}; convert the model again with ctranslate2 >= 3")
    spec = reader.string()
    revision = reader.unpack("<I")
    variables = {}
    for _ in range(reader.unpack("<I")):
        name = reader.string()
        shape = tuple(reader.unpack("<I") for _ in range(reader.unpack("<B")))
        dtype = _DTYPES.get(reader.unpack("<B"))
        size = reader.unpack("<I")
        raw = reader.take(size)
        if dtype is None:
            raise ConversionError(f"{path}: tensor {name} has an unknown CTranslate2 data type")
        if isinstance(dtype, str) or (dtype.kind == "i" and shape):
            # a quantized weight: not openai's values, refused rather than silently made inexact
            variables[name] = ("quantized", dtype if isinstance(dtype, str) else dtype.name)
            continue
        if dtype.itemsize * int(np.prod(shape, dtype=np.int64)) != size:
            raise ConversionError(f"{path}: tensor {name} has {size} bytes for shape {list(shape)}")
        variables[name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
    aliases = {}
    for _ in range(reader.unpack("<I")):
        alias = reader.string()
        aliases[alias] = reader.string()
    if reader.offset != len(data):
        raise ConversionError(f"{path} has {len(data) - reader.offset} unexpected bytes after the model")
    return spec, revision, variables, aliases


def _vocabulary(folder: Path) -> dict[int, str]:
    if (folder / "vocabulary.json").is_file():
        tokens = json.loads((folder / "vocabulary.json").read_text(encoding="utf-8"))
    elif (folder / "vocabulary.txt").is_file():
        tokens = (folder / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()  # the file ends with a newline
    else:
        raise ConversionError(f"{folder} has no vocabulary.txt or vocabulary.json")
    return dict(enumerate(tokens))


def read(folder: Path) -> Source:
    model_bin = folder / "model.bin"
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{folder}/config.json cannot be read: {exc}") from None
    spec, _, variables, aliases = read_model_bin(model_bin)
    if spec != SPEC_NAME:
        raise ConversionError(f"{model_bin} holds a CTranslate2 {spec}, not a Whisper model")
    quantized = sorted({kind for value in variables.values() if isinstance(value, tuple) for kind in value[1:]})
    if quantized:
        raise ConversionError(f"{model_bin} is quantized ({', '.join(quantized)} weights), so it no longer holds "
                              "Whisper's values; convert it with ct2-transformers-converter --quantization float16 "
                              "(or float32), or pass the openai .pt")
    for alias, target in aliases.items():
        variables.setdefault(alias, variables.get(target))

    def get(name: str) -> np.ndarray:
        value = variables.get(name)
        if not isinstance(value, np.ndarray):
            raise ConversionError(f"{model_bin} has no tensor {name}; not a CTranslate2 Whisper model")
        return value

    tensors = {}

    def linear(target: str, source: str, bias: bool = True) -> None:
        tensors[f"{target}.weight"] = get(f"{source}/weight")
        if bias:
            tensors[f"{target}.bias"] = get(f"{source}/bias")

    def layer_norm(target: str, source: str) -> None:
        tensors[f"{target}.weight"], tensors[f"{target}.bias"] = get(f"{source}/gamma"), get(f"{source}/beta")

    def split(target_prefix: str, source: str, parts: list[str]) -> None:
        """A fused projection: rows are the parts in order; a key bias must be zero (openai has none)."""
        weight, bias = get(f"{source}/weight"), get(f"{source}/bias")
        width = weight.shape[0] // len(parts)
        for i, part in enumerate(parts):
            rows = slice(i * width, (i + 1) * width)
            tensors[f"{target_prefix}.{part}.weight"] = weight[rows]
            if part == "key":
                if np.any(bias[rows]):
                    raise ConversionError(f"{model_bin}: {source} has a non-zero key bias, which openai's Whisper "
                                          "has no place for")
            else:
                tensors[f"{target_prefix}.{part}.bias"] = bias[rows]

    def block(target: str, source: str, cross: bool) -> None:
        split(f"{target}.attn", f"{source}/self_attention/linear_0", ["query", "key", "value"])
        linear(f"{target}.attn.out", f"{source}/self_attention/linear_1")
        layer_norm(f"{target}.attn_ln", f"{source}/self_attention/layer_norm")
        if cross:
            linear(f"{target}.cross_attn.query", f"{source}/attention/linear_0")
            split(f"{target}.cross_attn", f"{source}/attention/linear_1", ["key", "value"])
            linear(f"{target}.cross_attn.out", f"{source}/attention/linear_2")
            layer_norm(f"{target}.cross_attn_ln", f"{source}/attention/layer_norm")
        linear(f"{target}.mlp.0", f"{source}/ffn/linear_0")
        linear(f"{target}.mlp.2", f"{source}/ffn/linear_1")
        layer_norm(f"{target}.mlp_ln", f"{source}/ffn/layer_norm")

    def count(prefix: str) -> int:
        return len({name.split("/")[1] for name in variables if re.match(rf"{prefix}/layer_\d+/", name)})

    n_audio_layer, n_text_layer = count("encoder"), count("decoder")
    linear("encoder.conv1", "encoder/conv1")
    linear("encoder.conv2", "encoder/conv2")
    tensors["encoder.positional_embedding"] = get("encoder/position_encodings/encodings")
    for i in range(n_audio_layer):
        block(f"encoder.blocks.{i}", f"encoder/layer_{i}", cross=False)
    layer_norm("encoder.ln_post", "encoder/layer_norm")
    tensors["decoder.token_embedding.weight"] = get("decoder/embeddings/weight")
    tensors["decoder.positional_embedding"] = get("decoder/position_encodings/encodings")
    for i in range(n_text_layer):
        block(f"decoder.blocks.{i}", f"decoder/layer_{i}", cross=True)
    layer_norm("decoder.ln", "decoder/layer_norm")
    if not np.array_equal(get("decoder/projection/weight"), tensors["decoder.token_embedding.weight"]):
        raise ConversionError(f"{model_bin}: the output projection differs from the token embedding; "
                              "openai's Whisper ties them")

    conv1 = tensors["encoder.conv1.weight"]
    audio_state, text_state = conv1.shape[0], tensors["decoder.token_embedding.weight"].shape[1]
    dims = {"n_mels": conv1.shape[1], "n_audio_ctx": tensors["encoder.positional_embedding"].shape[0],
            "n_audio_state": audio_state, "n_audio_head": audio_state // HEAD_WIDTH, "n_audio_layer": n_audio_layer,
            "n_vocab": tensors["decoder.token_embedding.weight"].shape[0],
            "n_text_ctx": tensors["decoder.positional_embedding"].shape[0], "n_text_state": text_state,
            "n_text_head": text_state // HEAD_WIDTH, "n_text_layer": n_text_layer}
    dims = {k: int(v) for k, v in dims.items()}
    check_tensors(folder, dims, tensors)
    tokenizer = check_vocabulary(folder, _vocabulary(folder), dims["n_vocab"])
    tensors, narrowed = narrow_exact_float32(tensors)
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    files = hashed(folder, names)
    heads = config.get("alignment_heads")
    return Source(path=folder, format="ctranslate2", dims=dims, tensors=tensors, files=files,
                  sha256=next(f.sha256 for f in files if f.name == "model.bin"),
                  alignment_heads=[[int(layer), int(head)] for layer, head in heads] if heads else None,
                  notes={"tokenizer": tokenizer, "float32_narrowed_to_float16": narrowed})
