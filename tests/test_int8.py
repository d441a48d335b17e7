"""The int8 build (`make compile DECODER_WEIGHTS=int8`, the runtime's compute type int8): its
quantization (the decoder's token-row weights by groups of 64 inputs, the audio rows' weights by
output), the folder it is kept in beside the exact build, the refusals where it does not apply,
and on openai's real tiny.en a transcript close to the exact one (the agreement is printed; what is
asserted is a loose bound, since the build is not exact by design).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from audio_samples import varied_speech
from conftest import run_tool

from bench.wer import word_error_rate
from contracts import STEP_CACHES_AT


def test_quantization_rounds_each_group_of_64_inputs_to_its_own_scale():
    from graph_builders.weights import quantize

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((96, 128)) * 0.05).astype(np.float16)  # (out, in) as checkpoints store it
    weight[3] = 0  # an output of zeros
    weight[5, 70] = 4.0  # an outlier widens its own group's scale only
    quantized, scale = quantize(weight)
    assert scale.shape == (2, 96) and quantized.shape == (128, 96) and quantized.dtype == np.int8
    per_value = np.repeat(scale, 64, axis=0)  # (in, out), like the quantized transpose
    assert np.all(np.abs(quantized * per_value - weight.astype(np.float32).T) <= per_value / 2 + 1e-8)
    assert not quantized[:, 3].any() and not scale[:, 3].any()
    groups = np.abs(quantized.astype(np.int32)).reshape(2, 64, 96).max(axis=1)
    assert np.all(groups[:, np.arange(96) != 3] == 127)  # each group's largest value uses the full range
    assert scale[1, 5] == pytest.approx(4.0 / 127) and scale[0, 5] < scale[1, 5] / 10


def test_per_output_quantization_packs_each_column_tile_for_the_kernel():
    from graph_builders.weights import WeightError, quantize_per_output

    rng = np.random.default_rng(1)
    weight = (rng.standard_normal((320, 96)) * 0.05).astype(np.float16)  # (out, in); 5 tiles of 64 outputs
    weight[3] = 0
    weight[70, 5] = 4.0  # an outlier coarsens its own output only
    packed, scale = quantize_per_output(weight, rows=128)  # blocks that split the tiles unevenly
    assert packed.shape == (5, 96 * 64) and packed.dtype == np.int8 and scale.shape == (320,)
    # element [t, g * 256 + c * 4 + j] is output 64t + c, input 4g + j
    values = packed.reshape(5, 24, 64, 4).transpose(0, 2, 1, 3).reshape(320, 96)
    assert packed[1, 2 * 256 + 6 * 4 + 1] == values[70, 9]
    assert np.all(np.abs(values * scale[:, None] - weight.astype(np.float32)) <= scale[:, None] / 2 + 1e-8)
    assert not values[3].any() and scale[3] == 0
    assert np.all(np.abs(values.astype(np.int32)).max(axis=1)[np.arange(320) != 3] == 127)
    assert scale[70] == pytest.approx(4.0 / 127) and scale[71] < scale[70] / 10
    # outputs that do not fill the last tile (the vocabulary's): zeros with scale 0 after them
    ragged, ragged_scale = quantize_per_output(weight[:100], rows=128)
    assert ragged.shape == (2, 96 * 64) and ragged_scale.shape == (128,)
    assert np.array_equal(ragged[0], packed[0]) and np.array_equal(ragged_scale[:100], scale[:100])
    tail = ragged.reshape(2, 24, 64, 4).transpose(0, 2, 1, 3).reshape(128, 96)
    assert np.array_equal(tail[64:100], values[64:100]) and not tail[100:].any() and not ragged_scale[100:].any()
    with pytest.raises(WeightError, match="multiple of 4 inputs"):
        quantize_per_output(weight[:, :94])


def test_int8_build_is_refused_where_it_does_not_apply(tiny_model_dir, tmp_path):
    from graph_builders.compile import CompileError, compile_model
    from runtime import load_model
    from runtime.engine import ArtifactError

    with pytest.raises(ArtifactError, match=r"run `make compile NAME=tiny-random DEVICE=cpu DECODER_WEIGHTS=int8`"):
        load_model(tiny_model_dir, compute_type="int8")  # only the exact build is there
    with pytest.raises(ArtifactError, match="compute type int8 is a CPU build"):
        load_model(tiny_model_dir, device="gpu", compute_type="int8")
    with pytest.raises(ArtifactError, match="unknown compute type 'int4'"):
        load_model(tiny_model_dir, compute_type="int4")
    with pytest.raises(CompileError, match="CPU option"):
        compile_model(tmp_path, device="gpu", decoder_weights="int8")
    assert not (tmp_path / "gpu-sm_90a").exists()


@pytest.fixture(scope="module")
def real_tiny_en_int8(real_tiny_en_dir):
    """The real tiny.en's int8 build, compiled beside its exact one."""
    from runtime import load_model

    run_tool("graph-builders", "compile", str(real_tiny_en_dir), "--device", "cpu", "--decoder-weights", "int8")
    return load_model(real_tiny_en_dir, compute_type="int8")


def test_int8_build_sits_beside_the_exact_one(real_tiny_en_dir, real_tiny_en_int8, isolated_copy):
    from runtime import load_model
    from runtime.engine import ArtifactError

    int8 = json.loads((real_tiny_en_dir / "cpu-int8" / "manifest.json").read_text())
    exact = json.loads((real_tiny_en_dir / "cpu" / "manifest.json").read_text())
    assert int8["decoder_weights"] == {"dtype": "int8", "exact": False, "logits": "rescored"}
    assert exact["decoder_weights"] == {"dtype": "float16", "exact": True}
    step = {w["name"]: w for w in int8["graphs"]["decoder_step"]["weights"]}
    # the decoder's linears: int8 in panels of 64 outputs, one scale per 64 inputs of an output
    assert step["decoder.blocks.0.mlp.0.weight:panels@int8"]["shape"] == [1536 // 64, 384 * 64]
    assert step["decoder.blocks.0.mlp.0.weight:group_scale"]["shape"] == [6, 1536]
    assert not any(name.endswith(":transpose@int8") for name in step)
    # the output projection: int8 for VNNI by token (the vocabulary padded to whole tiles of 64), and
    # the embedding's own fp16 rows, which the token lookup and the logits near the best read
    assert step["decoder.token_embedding.weight:vnni_pack@int8"]["shape"] == [811, 384 * 64]
    assert step["decoder.token_embedding.weight:output_scale"]["shape"] == [811 * 64]
    assert step["decoder.token_embedding.weight@float16"]["shape"] == [51864, 384]
    assert not any(name.startswith("decoder.token_embedding.weight:transpose") for name in step)
    # the audio's rows (the encoder's linears, the cross-attention key and value projections of the
    # audio) are int8 by output, packed for the kernel; the convolutions stay fp32
    prefill = {w["name"]: w for w in int8["graphs"]["decoder_prefill"]["weights"]}
    assert prefill["decoder.blocks.0.cross_attn.key.weight:vnni_pack@int8"]["shape"] == [6, 384 * 64]
    assert prefill["decoder.blocks.0.cross_attn.key.weight:output_scale"]["shape"] == [384]
    assert not any("cross_attn.key" in name and "float16" in name for name in prefill)
    encoder = {w["name"]: w for w in int8["graphs"]["encoder"]["weights"]}
    assert encoder["encoder.blocks.0.mlp.0.weight:vnni_pack@int8"]["shape"] == [1536 // 64, 384 * 64]
    assert encoder["encoder.blocks.3.mlp.2.weight:vnni_pack@int8"]["shape"] == [384 // 64, 1536 * 64]
    assert "encoder.conv2.weight:conv1d_rscf" in encoder
    assert not any(name.endswith(":transpose") for name in encoder)
    assert int8["cpu_features"] == exact["cpu_features"] and "avx2" in exact["cpu_features"]
    # the audio's cross-attention keys and values the steps read: fp16 here, fp32 in the exact build
    cross = STEP_CACHES_AT + 2 * int8["model"]["dims"]["n_text_layer"]
    assert int8["graphs"]["decoder_step"]["inputs"][cross]["dtype"] == "DType.float16"
    assert exact["graphs"]["decoder_step"]["inputs"][cross]["dtype"] == "DType.float32"
    assert real_tiny_en_int8.cross_dtype == "float16"

    # an int8 build where the exact one belongs is refused, not run as exact
    swapped = isolated_copy(real_tiny_en_dir)
    shutil.rmtree(swapped / "cpu")
    (swapped / "cpu-int8").rename(swapped / "cpu")
    with pytest.raises(ArtifactError, match="holds an int8 build, compute type exact was asked for"):
        load_model(swapped)


def test_the_fp16_embedding_is_mapped_from_the_weights_file(real_tiny_en_dir, real_tiny_en_int8, real_tiny_en_runtime):
    """The int8 build's fp16 token embedding, which its graphs only gather rows of, is a writable copy-on-write
    mapping of the weights file, not read with the rest (only the pages a transcription touches become
    resident): the same values as read; the exact build maps nothing (its logits read the whole embedding)."""
    import mmap

    from runtime.engine import _gathered_weights, _read_weights

    name = "decoder.token_embedding.weight@float16"
    int8 = json.loads((real_tiny_en_dir / "cpu-int8" / "manifest.json").read_text())
    assert _gathered_weights(int8) == {name}
    assert _gathered_weights(json.loads((real_tiny_en_dir / "cpu" / "manifest.json").read_text())) == frozenset()

    def owner(array):  # what holds an array's memory: its base arrays' base (a memoryview: its object)
        while isinstance(array, np.ndarray):
            array = array.base
        return array.obj if isinstance(array, memoryview) else array

    mapped = real_tiny_en_int8._weights[name]
    assert isinstance(owner(mapped), mmap.mmap) and mapped.flags.writeable
    assert not any(isinstance(owner(a), mmap.mmap) for n, a in real_tiny_en_int8._weights.items() if n != name)
    assert not any(isinstance(owner(a), mmap.mmap) for a in real_tiny_en_runtime._weights.values())
    read = _read_weights(real_tiny_en_dir / "cpu-int8" / "weights.safetensors", "make compile")
    assert sorted(read) == sorted(real_tiny_en_int8._weights)
    for n, array in read.items():
        assert array.dtype == real_tiny_en_int8._weights[n].dtype
        np.testing.assert_array_equal(real_tiny_en_int8._weights[n], array, err_msg=n)


def test_an_int8_build_that_leaves_the_logits_near_the_best_to_the_runtime_is_refused(
        real_tiny_en_dir, real_tiny_en_int8, isolated_copy):
    from runtime import load_model
    from runtime.engine import ArtifactError

    copy = isolated_copy(real_tiny_en_dir)
    manifest_path = copy / "cpu-int8" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["decoder_weights"]["logits"]
    manifest["decoder_weights"]["hidden_output"] = True  # how the previous version marked its int8 builds
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"an int8 build of an earlier version .*DECODER_WEIGHTS=int8"):
        load_model(copy, compute_type="int8")


def test_a_build_from_a_cpu_with_features_this_one_lacks_is_refused(real_tiny_en_dir, real_tiny_en_int8,
                                                                    isolated_copy, monkeypatch):
    """Compiled code uses the building CPU's instructions (the int8 build: VNNI); elsewhere it would
    crash, so the runtime names what is missing and the command that rebuilds for this CPU."""
    import runtime.engine
    from runtime import load_model
    from runtime.engine import ArtifactError

    copy = isolated_copy(real_tiny_en_dir)
    manifest_path = copy / "cpu-int8" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["cpu_features"] = ["avx2", "avx512_vnni"]
    manifest_path.write_text(json.dumps(manifest))
    monkeypatch.setattr(runtime.engine, "cpu_features", lambda: ["avx2", "fma"])
    with pytest.raises(ArtifactError, match=r"built on a CPU with avx512_vnni, which this CPU lacks; .*make compile"):
        load_model(copy, compute_type="int8")


@pytest.fixture(scope="module")
def speech(work_dir):
    return varied_speech(work_dir / "varied-speech-int8.wav")


def test_real_tiny_en_int8_transcribes_close_to_exact(speech, real_tiny_en_runtime, real_tiny_en_int8):
    import difflib

    import runtime
    from runtime.audio import load_audio

    path, text = speech
    audio = load_audio(str(path))
    exact = runtime.transcribe(real_tiny_en_runtime, audio, verbose=None)
    int8 = runtime.transcribe(real_tiny_en_int8, audio, verbose=None)
    exact_tokens = [t for s in exact["segments"] for t in s["tokens"]]
    int8_tokens = [t for s in int8["segments"] for t in s["tokens"]]
    matcher = difflib.SequenceMatcher(a=exact_tokens, b=int8_tokens, autojunk=False)
    agreement = sum(block.size for block in matcher.get_matching_blocks()) / len(exact_tokens)
    exact_wer, int8_wer = word_error_rate(text, exact["text"]), word_error_rate(text, int8["text"])
    print(f"\nint8: {len(int8_tokens)} tokens, {100 * agreement:.1f}% of the exact build's {len(exact_tokens)} in "
          f"order; word error rate {100 * int8_wer:.1f}% (exact {100 * exact_wer:.1f}%), "
          f"{100 * word_error_rate(exact['text'], int8['text']):.1f}% against the exact transcript")
    assert len(exact_tokens) > 100 and agreement > 0.8
    assert int8_wer < exact_wer + 0.05


def test_cli_transcribes_with_compute_type_int8(speech, real_tiny_en_dir, real_tiny_en_int8, tmp_path):
    path, _ = speech
    result = run_tool("runtime", "transcribe", str(path), "--model", str(real_tiny_en_dir), "--compute-type", "int8",
                      "--beam-size", "none", "--clip-timestamps", "0,20", "--output-format", "txt",
                      "--output-dir", str(tmp_path), "--verbose", "False")
    written = (tmp_path / f"{path.stem}.txt").read_text()
    assert len(written.split()) > 10, result.stderr


def test_int8_transcribe_batch_decodes_each_file_as_alone(speech, real_tiny_en_int8):
    """The running batch's fp16 cross-attention pools: a batch of files gives each file's own tokens
    (rows are independent in every kernel), as in the exact build (tests/test_batched.py)."""
    import runtime
    from runtime.audio import load_audio

    audio = load_audio(str(speech[0]))
    files = [audio[: 50 * 16000], audio[20 * 16000: 45 * 16000]]
    options = dict(without_timestamps=True, condition_on_previous_text=False, beam_size=None, temperature=0.0)
    batched = runtime.transcribe_batch(real_tiny_en_int8, files, batch_size=3, **options)
    for samples, ours in zip(files, batched):
        alone = runtime.transcribe(real_tiny_en_int8, samples, batch_windows=1, verbose=None, **options)
        assert [s["tokens"] for s in ours["segments"]] == [s["tokens"] for s in alone["segments"]]
        assert len(ours["text"].split()) > 20
