"""openai `.pt` -> Hugging Face transformers folder -> CTranslate2 (faster-whisper) folder, offline,
with those projects' own converters: the folders users get from them, made from a checkpoint whose
every value is known.

transformers' converter (transformers 4.47.1, the last release that ships convert_openai_to_hf.py)
fetches the tiktoken files and the generation config from the network; here they come from
openai-whisper's bundled assets and its tokenizer instead.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _offline_transformers_converter():
    import transformers.models.whisper.convert_openai_to_hf as convert
    import whisper
    from tiktoken.load import load_tiktoken_bpe
    from transformers import GenerationConfig
    from whisper.tokenizer import LANGUAGES, get_tokenizer

    assets = Path(whisper.__file__).parent / "assets"
    convert._TOKENIZERS = {"multilingual": str(assets / "multilingual.tiktoken"),
                           "english": str(assets / "gpt2.tiktoken")}
    convert.load_tiktoken_bpe = load_tiktoken_bpe  # the module imports it only when run as a script

    def generation_config(is_multilingual, num_languages=100, openai_version=None):
        tokenizer = get_tokenizer(is_multilingual, num_languages=num_languages)
        languages = list(LANGUAGES)[:num_languages]
        return GenerationConfig(
            decoder_start_token_id=tokenizer.sot, bos_token_id=tokenizer.eot, eos_token_id=tokenizer.eot,
            pad_token_id=tokenizer.eot, max_length=448, begin_suppress_tokens=[220, tokenizer.eot],
            suppress_tokens=list(tokenizer.non_speech_tokens), no_timestamps_token_id=tokenizer.no_timestamps,
            prev_sot_token_id=tokenizer.sot_prev, is_multilingual=is_multilingual, forced_decoder_ids=None,
            lang_to_id={f"<|{code}|>": tokenizer.special_tokens[f"<|{code}|>"] for code in languages}
            if is_multilingual else {},
            task_to_id={"transcribe": tokenizer.transcribe, "translate": tokenizer.translate} if is_multilingual else {},
            alignment_heads=None)

    convert._get_generation_config = generation_config
    return convert


def to_transformers(checkpoint: Path, folder: Path) -> Path:
    """A transformers WhisperForConditionalGeneration folder (model.safetensors in float32, tokenizer.json)."""
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizerFast

    convert = _offline_transformers_converter()
    model, is_multilingual, num_languages = convert.convert_openai_whisper_to_tfms(str(checkpoint), str(folder))
    tokenizer = convert.convert_tiktoken_to_hf(is_multilingual, num_languages)
    features = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)
    WhisperProcessor(tokenizer=tokenizer, feature_extractor=features).save_pretrained(str(folder))
    WhisperTokenizerFast.from_pretrained(str(folder)).save_pretrained(str(folder), legacy_format=False)
    model.save_pretrained(str(folder))
    return folder


def to_ctranslate2(transformers_folder: Path, folder: Path, quantization: str = "float16") -> Path:
    """A faster-whisper folder, as `ct2-transformers-converter --quantization Q` writes it."""
    import ctranslate2

    class Converter(ctranslate2.converters.TransformersConverter):
        # ctranslate2 >= 4.6 passes dtype=, which transformers 4.47 knows as torch_dtype=
        def load_model(self, model_class, path, **kwargs):
            if "dtype" in kwargs:
                kwargs["torch_dtype"] = kwargs.pop("dtype")
            return model_class.from_pretrained(path, **kwargs)

    Converter(str(transformers_folder), copy_files=["tokenizer.json", "preprocessor_config.json"]).convert(
        str(folder), quantization=quantization, force=True)
    return folder
