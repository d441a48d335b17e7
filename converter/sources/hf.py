"""Hugging Face transformers Whisper folders (distil-whisper, language fine-tunes): `config.json` with
`model_type: whisper`, weights in `model.safetensors` (sharded or not) or `pytorch_model.bin`
(loaded with `weights_only=True`), the tokenizer in `tokenizer.json` or `vocab.json` + `added_tokens.json`.

transformers names every tensor differently but keeps openai's layouts, so the mapping is by name
only; the output projection is tied to the token embedding (refused if a folder unties it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..checkpoint import ConversionError
from . import Source, check_tensors, hashed, narrow_exact_float32
from .vocabulary import check_vocabulary

# transformers' name (without "model.") -> openai-whisper's, for everything outside the layers
_TOP = {"encoder.conv1": "encoder.conv1", "encoder.conv2": "encoder.conv2",
        "encoder.embed_positions.weight": "encoder.positional_embedding",
        "encoder.layer_norm": "encoder.ln_post", "decoder.embed_tokens.weight": "decoder.token_embedding.weight",
        "decoder.embed_positions.weight": "decoder.positional_embedding", "decoder.layer_norm": "decoder.ln"}
# inside encoder.layers.N / decoder.layers.N
_LAYER = {"self_attn.q_proj": "attn.query", "self_attn.k_proj": "attn.key", "self_attn.v_proj": "attn.value",
          "self_attn.out_proj": "attn.out", "self_attn_layer_norm": "attn_ln",
          "encoder_attn.q_proj": "cross_attn.query", "encoder_attn.k_proj": "cross_attn.key",
          "encoder_attn.v_proj": "cross_attn.value", "encoder_attn.out_proj": "cross_attn.out",
          "encoder_attn_layer_norm": "cross_attn_ln", "fc1": "mlp.0", "fc2": "mlp.2", "final_layer_norm": "mlp_ln"}
_LAYER_NAME = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def openai_name(name: str) -> str | None:
    """transformers' tensor name -> openai-whisper's; None for a tensor openai's model has no place for."""
    name = name.removeprefix("model.")
    if name in _TOP:
        return _TOP[name]
    for prefix, target in _TOP.items():
        if name.startswith(prefix + "."):
            return target + name[len(prefix):]
    match = _LAYER_NAME.match(name)
    if match and match.group(3) in _LAYER:
        part, layer, module, kind = match.groups()
        return f"{part}.blocks.{layer}.{_LAYER[module]}.{kind}"
    return None


def _weight_files(folder: Path) -> list[str]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError):
                raise ConversionError(f"{folder / index} is not a shard index (no weight_map)") from None
            return [index, *sorted(set(weight_map.values()))]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [single]
    raise ConversionError(f"{folder} has a config.json but no weights (model.safetensors or pytorch_model.bin)")


def _load_weights(folder: Path, files: list[str]) -> dict[str, np.ndarray]:
    tensors = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise ConversionError(f"{folder}: shard {name} named by the index is missing")
        if name.endswith(".index.json"):
            continue
        if name.endswith(".safetensors"):
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(path), framework="np") as handle:
                    for key in handle.keys():
                        tensors[key] = handle.get_tensor(key)
            except (SafetensorError, OSError, ValueError, TypeError) as exc:
                raise ConversionError(f"{path} is not a readable safetensors file: {exc}") from None
        else:
            import torch

            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ConversionError(f"{path} is not a loadable PyTorch state dict: {reason}") from None
            for key, tensor in state.items():
                tensor = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
                tensors[key] = tensor.contiguous().numpy()
    return tensors


def _vocabulary(folder: Path) -> dict[int, str]:
    try:
        if (folder / "tokenizer.json").is_file():
            data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
            vocab = dict(data["model"]["vocab"])
            vocab.update({token["content"]: token["id"] for token in data.get("added_tokens", [])})
        elif (folder / "vocab.json").is_file():
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            if (folder / "added_tokens.json").is_file():
                vocab.update(json.loads((folder / "added_tokens.json").read_text(encoding="utf-8")))
        else:
            raise ConversionError(f"{folder} has no tokenizer (tokenizer.json or vocab.json)")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConversionError(f"{folder}: the tokenizer files cannot be read ({exc})") from None
    return {int(token_id): token for token, token_id in vocab.items()}


def read(folder: Path) -> Source:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{folder}/config.json cannot be read: {exc}") from None
    if not isinstance(config, dict) or config.get("model_type") != "whisper":
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise ConversionError(f"{folder} is a Hugging Face {kind or 'unknown'} model, not Whisper "
                              "(config.json model_type must be 'whisper')")
    try:
        dims = {"n_mels": config["num_mel_bins"], "n_audio_ctx": config["max_source_positions"],
                "n_audio_state": config["d_model"], "n_audio_head": config["encoder_attention_heads"],
                "n_audio_layer": config["encoder_layers"], "n_vocab": config["vocab_size"],
                "n_text_ctx": config["max_target_positions"], "n_text_state": config["d_model"],
                "n_text_head": config["decoder_attention_heads"], "n_text_layer": config["decoder_layers"]}
    except KeyError as exc:
        raise ConversionError(f"{folder}/config.json lacks {exc.args[0]}") from None
    files = _weight_files(folder)
    stored = _load_weights(folder, files)
    tensors, unplaced = {}, []
    for name, array in stored.items():
        target = openai_name(name)
        if target is None:
            if name.removeprefix("model.") != "proj_out.weight":
                unplaced.append(name)
            continue
        tensors[target] = array
    if unplaced:
        raise ConversionError(f"{folder}: {len(unplaced)} tensor(s) openai's Whisper has no place for, "
                              f"e.g. {unplaced[0]}")
    projection = stored.get("proj_out.weight", stored.get("model.proj_out.weight"))
    if projection is not None and not np.array_equal(projection, tensors.get("decoder.token_embedding.weight")):
        raise ConversionError(f"{folder}: proj_out differs from the token embedding; openai's Whisper ties them")
    check_tensors(folder, dims, tensors)
    tokenizer = check_vocabulary(folder, _vocabulary(folder), dims["n_vocab"])
    tensors, narrowed = narrow_exact_float32(tensors)
    heads = None
    if (folder / "generation_config.json").is_file():
        try:
            heads = json.loads((folder / "generation_config.json").read_text()).get("alignment_heads")
        except (OSError, ValueError, AttributeError):
            raise ConversionError(f"{folder}/generation_config.json cannot be read") from None
    others = sorted(p.name for p in folder.iterdir()
                    if p.is_file() and p.name not in files and p.suffix in (".json", ".txt"))
    hashed_files = hashed(folder, [*files, *others])
    weights_sha256 = hashed_files[0].sha256  # the single weights file, or the shard index
    return Source(path=folder, format="transformers", dims=dims, tensors=tensors, files=hashed_files,
                  sha256=weights_sha256,
                  alignment_heads=[[int(layer), int(head)] for layer, head in heads] if heads else None,
                  notes={"tokenizer": tokenizer, "float32_narrowed_to_float16": narrowed})
