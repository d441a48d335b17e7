"""The int8 decoder build (`make compile DECODER_WEIGHTS=int8`, the runtime's compute type int8): its
quantization, the folder it is kept in beside the exact build, the refusals where it does not apply,
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


def test_quantization_rounds_each_group_of_64_inputs_to_its_own_scale():
    from runtime.engine import _quantize

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((96, 128)) * 0.05).astype(np.float16)  # (out, in) as checkpoints store it
    weight[3] = 0  # an output of zeros
    weight[5, 70] = 4.0  # an outlier widens its own group's scale only
    quantized, scale = _quantize(weight)
    assert scale.shape == (2, 96) and quantized.shape == (128, 96) and quantized.dtype == np.int8
    per_value = np.repeat(scale, 64, axis=0)  # (in, out), like the quantized transpose
    assert np.all(np.abs(quantized * per_value - weight.astype(np.float32).T) <= per_value / 2 + 1e-8)
    assert not quantized[:, 3].any() and not scale[:, 3].any()
    groups = np.abs(quantized.astype(np.int32)).reshape(2, 64, 96).max(axis=1)
    assert np.all(groups[:, np.arange(96) != 3] == 127)  # each group's largest value uses the full range
    assert scale[1, 5] == pytest.approx(4.0 / 127) and scale[0, 5] < scale[1, 5] / 10


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
    assert int8["decoder_weights"] == {"dtype": "int8", "exact": False}
    assert exact["decoder_weights"] == {"dtype": "float16", "exact": True}
    step = {w["name"]: w for w in int8["graphs"]["decoder_step"]["weights"]}
    assert step["decoder.token_embedding.weight:transpose@int8"]["shape"] == [384, 51864]
    assert step["decoder.token_embedding.weight:group_scale"]["shape"] == [6, 51864]
    # the audio's key and value projections, not read per token, stay the exact fp16 values
    prefill = {w["name"] for w in int8["graphs"]["decoder_prefill"]["weights"]}
    assert "decoder.blocks.0.cross_attn.key.weight:transpose@float16" in prefill
    assert int8["graphs"]["encoder"]["signature"] == exact["graphs"]["encoder"]["signature"]
    # the audio's cross-attention keys and values the steps read: fp16 here, fp32 in the exact build
    cross = 3 + 2 * int8["model"]["dims"]["n_text_layer"]
    assert int8["graphs"]["decoder_step"]["inputs"][cross]["dtype"] == "DType.float16"
    assert exact["graphs"]["decoder_step"]["inputs"][cross]["dtype"] == "DType.float32"
    assert real_tiny_en_int8.cross_dtype == "float16"

    # an int8 build where the exact one belongs is refused, not run as exact
    swapped = isolated_copy(real_tiny_en_dir)
    shutil.rmtree(swapped / "cpu")
    (swapped / "cpu-int8").rename(swapped / "cpu")
    with pytest.raises(ArtifactError, match="holds an int8 build, compute type exact was asked for"):
        load_model(swapped)


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
