"""The tokenizer a folder ships must be one of openai-whisper's: gpt2 (English-only models) or
multilingual, with the special tokens at the usual ids. This project always uses openai-whisper's own
tiktoken files, so a folder whose vocabulary differs (a retrained tokenizer, another model's) is
refused rather than decoded with the wrong text."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import ConversionError, language_info


# Hugging Face's Whisper tokenizer names two special tokens as openai-whisper's first release did:
# Hebrew under its older ISO code, and no-speech as "nocaptions". The same tokens at the same ids.
TOKEN_ALIASES = {"<|iw|>": "<|he|>", "<|nocaptions|>": "<|nospeech|>"}


def _byte_level(data: bytes) -> str:
    """GPT-2's byte-to-unicode mapping, the way Hugging Face and CTranslate2 write BPE tokens."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return "".join(table[b] for b in data)


def openai_tokens(n_vocab: int) -> list[str]:
    """Every token of openai-whisper's tokenizer for a model with n_vocab, as folders write them."""
    from whisper.tokenizer import get_encoding

    is_multilingual, num_languages = language_info(n_vocab)
    encoding = get_encoding("multilingual" if is_multilingual else "gpt2", num_languages=num_languages)
    tokens = [None] * n_vocab
    for name, token_id in encoding._special_tokens.items():
        if token_id < n_vocab:
            tokens[token_id] = name
    for token_id in range(encoding.n_vocab):
        if token_id < n_vocab and tokens[token_id] is None:
            tokens[token_id] = _byte_level(encoding.decode_single_token_bytes(token_id))
    return tokens


def check_vocabulary(path: Path, tokens: dict[int, str], n_vocab: int) -> str:
    """`tokens`: id -> token as the folder has them. Returns the tokenizer's name (gpt2 or multilingual)."""
    expected = openai_tokens(n_vocab)
    is_multilingual, _ = language_info(n_vocab)
    name = "multilingual" if is_multilingual else "gpt2"
    missing = [i for i in range(n_vocab) if i not in tokens]
    if missing:
        raise ConversionError(f"{path}: the vocabulary has no token {missing[0]} of the model's {n_vocab}; "
                              f"expected openai-whisper's {name} tokenizer")
    differing = [i for i in range(n_vocab) if TOKEN_ALIASES.get(tokens[i], tokens[i]) != expected[i]]
    if differing:
        i = differing[0]
        raise ConversionError(f"{path}: the tokenizer is not openai-whisper's {name} one ({len(differing)} token(s) "
                              f"differ, e.g. id {i}: {tokens[i]!r}, expected {expected[i]!r}); this project decodes "
                              "with openai-whisper's tokenizer only")
    return name
