"""Whisper's byte-level BPE tokenizer on tiktoken, equal to `whisper.tokenizer.get_tokenizer`.

The vocabulary (`multilingual.tiktoken` for multilingual models, `gpt2.tiktoken` for English-only
ones) is read from a path, since the converter copies it into each model's artifact folder. The
special tokens are appended after the BPE ranks in openai-whisper's order:

    <|endoftext|> <|startoftranscript|> <|en|> ... (num_languages) <|translate|> <|transcribe|>
    <|startoflm|> <|startofprev|> <|nospeech|> <|notimestamps|> <|0.00|> ... <|30.00|>

so every id equals openai-whisper's. Nothing here imports torch or openai-whisper.
"""

from __future__ import annotations

import binascii
import os
import string
import threading
from concurrent.futures import Future
from functools import cached_property, lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

import tiktoken

LANGUAGES = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian",
    "ko": "korean", "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish",
    "pl": "polish", "ca": "catalan", "nl": "dutch", "ar": "arabic", "sv": "swedish",
    "it": "italian", "id": "indonesian", "hi": "hindi", "fi": "finnish", "vi": "vietnamese",
    "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay", "cs": "czech",
    "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian",
    "la": "latin", "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak",
    "te": "telugu", "fa": "persian", "lv": "latvian", "bn": "bengali", "sr": "serbian",
    "az": "azerbaijani", "sl": "slovenian", "kn": "kannada", "et": "estonian", "mk": "macedonian",
    "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian", "ne": "nepali",
    "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian", "sw": "swahili",
    "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala", "km": "khmer",
    "sn": "shona", "yo": "yoruba", "so": "somali", "af": "afrikaans", "oc": "occitan",
    "ka": "georgian", "be": "belarusian", "tg": "tajik", "sd": "sindhi", "gu": "gujarati",
    "am": "amharic", "yi": "yiddish", "lo": "lao", "uz": "uzbek", "fo": "faroese",
    "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk", "mt": "maltese",
    "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan", "tl": "tagalog",
    "mg": "malagasy", "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala",
    "ha": "hausa", "ba": "bashkir", "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}  # fmt: skip

# language code by (lower-case) name, with the aliases openai-whisper accepts
TO_LANGUAGE_CODE = {
    **{name: code for code, name in LANGUAGES.items()},
    "burmese": "my", "valencian": "ca", "flemish": "nl", "haitian": "ht", "letzeburgesch": "lb",
    "pushto": "ps", "panjabi": "pa", "moldavian": "ro", "moldovan": "ro", "sinhalese": "si",
    "castilian": "es", "mandarin": "zh",
}  # fmt: skip

N_TIMESTAMPS = 1501  # <|0.00|> ... <|30.00|> in 0.02 s steps

# GPT-2's pre-tokenizer split pattern, as openai-whisper configures tiktoken
_PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# languages written without spaces between words; split_to_word_tokens splits them per character
_NO_SPACE_LANGUAGES = {"zh", "ja", "th", "lo", "my", "yue"}


class TokenizerError(ValueError):
    """A vocabulary file that cannot be read, or a language / task the tokenizer does not know."""


def special_token_names(num_languages: int) -> List[str]:
    """Special tokens in id order; they follow the BPE ranks."""
    languages = list(LANGUAGES)[:num_languages]
    return [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *[f"<|{code}|>" for code in languages],
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
        *[f"<|{i * 0.02:.2f}|>" for i in range(N_TIMESTAMPS)],
    ]


def _read_ranks(path: str) -> Dict[bytes, int]:
    ranks: Dict[bytes, int] = {}
    try:
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) != 2:
                    raise TokenizerError(f"{path}:{number}: expected '<base64 token> <rank>'")
                ranks[binascii.a2b_base64(fields[0])] = int(fields[1])  # base64.b64decode's own decoder
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read the vocabulary ({e.strerror or e})") from e
    except (ValueError, binascii.Error) as e:
        if isinstance(e, TokenizerError):
            raise
        raise TokenizerError(f"{path}: not a tiktoken vocabulary ({' '.join(str(e).split())})") from e
    if not ranks:
        raise TokenizerError(f"{path}: empty vocabulary")
    return ranks


_encodings: Dict[Tuple[str, int], Future] = {}  # (absolute path, num_languages) -> its Encoding
_encodings_lock = threading.Lock()


def get_encoding(encoding_path: str, num_languages: int = 99) -> tiktoken.Encoding:
    """The tiktoken Encoding of a `.tiktoken` vocabulary plus Whisper's special tokens, made once per
    process (a caller that comes while another thread makes it waits for that one: preload_encoding)."""
    key = (os.path.abspath(os.fspath(encoding_path)), int(num_languages))
    with _encodings_lock:
        made = _encodings.get(key)
        maker = made is None
        if maker:
            made = _encodings[key] = Future()
    if maker:
        try:
            made.set_result(_make_encoding(*key))
        except BaseException as e:
            with _encodings_lock:  # not kept: a vocabulary fixed on disk is read again next time
                del _encodings[key]
            made.set_exception(e)
    return made.result()


def preload_encoding(encoding_path: str, num_languages: int = 99) -> None:
    """Starts get_encoding on a daemon thread (reading the ranks and tiktoken's tables: 60-70 ms, on the
    way to the first token when made after the audio), so that it overlaps the model's loading; a
    failure is left for the transcription's own get_encoding to raise."""
    def make():
        try:
            get_encoding(encoding_path, num_languages)
        except BaseException:
            pass

    threading.Thread(target=make, name="tokenizer-preload", daemon=True).start()


def _make_encoding(path: str, num_languages: int) -> tiktoken.Encoding:
    ranks = _read_ranks(path)
    n_vocab = len(ranks)
    special_tokens = {}
    for name in special_token_names(num_languages):
        special_tokens[name] = n_vocab
        n_vocab += 1
    return tiktoken.Encoding(
        name=os.path.basename(path),
        explicit_n_vocab=n_vocab,
        pat_str=_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens=special_tokens,
    )


class Tokenizer:
    """Token ids and special tokens of one (language, task) configuration.

    Same attributes and methods as openai-whisper's Tokenizer; immutable after construction.
    """

    def __init__(self, encoding: tiktoken.Encoding, num_languages: int,
                 language: Optional[str] = None, task: Optional[str] = None):
        self.encoding = encoding
        self.num_languages = num_languages
        self.language = language
        self.task = task
        self.special_tokens: Dict[str, int] = {
            name: encoding.encode_single_token(name) for name in special_token_names(num_languages)
        }
        sequence = [self.sot]
        if language is not None:
            codes = tuple(LANGUAGES)[:num_languages]
            if language not in codes:
                raise TokenizerError(f"language {language!r} is not among this model's {num_languages} languages")
            sequence.append(self.sot + 1 + codes.index(language))
        if task is not None:
            sequence.append(self.transcribe if task == "transcribe" else self.translate)
        self.sot_sequence: Tuple[int, ...] = tuple(sequence)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.encoding.name!r}, num_languages={self.num_languages}, "
                f"language={self.language!r}, task={self.task!r})")

    # ---- text <-> ids

    def encode(self, text: str, **kwargs) -> List[int]:
        return self.encoding.encode(text, **kwargs)

    def encode_fixed(self, text: str) -> List[int]:
        """ids of one of the decoder's own strings (" ", the symbols it suppresses), which hold no
        special token: `encode` would look for one with a regex of all ~1,600 special tokens that
        tiktoken compiles on first use, ~75 ms before a transcription's first token (2-core AMD EPYC)."""
        return self.encoding.encode_ordinary(text)

    def decode(self, token_ids: Sequence[int], **kwargs) -> str:
        """Text of the ids, leaving out timestamp tokens."""
        begin = self.timestamp_begin
        return self.encoding.decode([int(t) for t in token_ids if t < begin], **kwargs)

    def decode_with_timestamps(self, token_ids: Sequence[int], **kwargs) -> str:
        """Text of the ids with timestamp tokens written as e.g. "<|1.08|>"."""
        return self.encoding.decode([int(t) for t in token_ids], **kwargs)

    # ---- special tokens

    @cached_property
    def eot(self) -> int:
        return self.encoding.eot_token

    @cached_property
    def sot(self) -> int:
        return self.special_tokens["<|startoftranscript|>"]

    @cached_property
    def transcribe(self) -> int:
        return self.special_tokens["<|transcribe|>"]

    @cached_property
    def translate(self) -> int:
        return self.special_tokens["<|translate|>"]

    @cached_property
    def sot_lm(self) -> int:
        return self.special_tokens["<|startoflm|>"]

    @cached_property
    def sot_prev(self) -> int:
        return self.special_tokens["<|startofprev|>"]

    @cached_property
    def no_speech(self) -> int:
        return self.special_tokens["<|nospeech|>"]

    @cached_property
    def no_timestamps(self) -> int:
        return self.special_tokens["<|notimestamps|>"]

    @cached_property
    def timestamp_begin(self) -> int:
        return self.special_tokens["<|0.00|>"]

    @cached_property
    def language_token(self) -> int:
        """The token of `language`; ValueError when the tokenizer has none."""
        if self.language is None:
            raise ValueError("This tokenizer does not have language token configured")
        return self.to_language_token(self.language)

    def to_language_token(self, language: str) -> int:
        token = self.special_tokens.get(f"<|{language}|>")
        if token is None:
            raise KeyError(f"Language {language} not found in tokenizer.")
        return token

    @cached_property
    def all_language_tokens(self) -> Tuple[int, ...]:
        """Language tokens in id order (<|en|>, <|zh|>, ...)."""
        return tuple(self.special_tokens[f"<|{code}|>"] for code in list(LANGUAGES)[: self.num_languages])

    @cached_property
    def all_language_codes(self) -> Tuple[str, ...]:
        return tuple(self.decode([token]).strip("<|>") for token in self.all_language_tokens)

    @cached_property
    def sot_sequence_including_notimestamps(self) -> Tuple[int, ...]:
        return tuple(self.sot_sequence) + (self.no_timestamps,)

    @cached_property
    def non_speech_tokens(self) -> Tuple[int, ...]:
        """Tokens of symbols that mark non-speech (♪, [SPEAKER], (laughs) ...), to suppress.

        Common punctuation stays allowed. A symbol that encodes to one token (bare or after a
        space) is suppressed; the musical symbols U+2640..U+267F are suppressed by their first
        token, which they share, even when they take several.
        """
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
        miscellaneous = "♩♪♫♬♭♮♯"
        # " -" and " '" begin a word: suppress them there; they stay allowed between words
        result = {self.encode_fixed(" -")[0], self.encode_fixed(" '")[0]}
        for symbol in symbols + list(miscellaneous):
            for ids in (self.encode_fixed(symbol), self.encode_fixed(" " + symbol)):
                if len(ids) == 1 or symbol in miscellaneous:
                    result.add(ids[0])
        return tuple(sorted(result))

    # ---- words (for word-level timestamps)

    def split_to_word_tokens(self, tokens: Sequence[int]) -> Tuple[List[str], List[List[int]]]:
        if self.language in _NO_SPACE_LANGUAGES:
            return self.split_tokens_on_unicode(tokens)
        return self.split_tokens_on_spaces(tokens)

    def split_tokens_on_unicode(self, tokens: Sequence[int]) -> Tuple[List[str], List[List[int]]]:
        """Split wherever the ids so far decode to whole characters."""
        full = self.decode_with_timestamps(tokens)
        replacement = "\ufffd"
        words: List[str] = []
        word_tokens: List[List[int]] = []
        current: List[int] = []
        offset = 0
        for token in tokens:
            current.append(int(token))
            text = self.decode_with_timestamps(current)
            # a replacement character is either an incomplete UTF-8 sequence or really in the text
            if replacement not in text or full[offset + text.index(replacement)] == replacement:
                words.append(text)
                word_tokens.append(current)
                current = []
                offset += len(text)
        return words, word_tokens

    def split_tokens_on_spaces(self, tokens: Sequence[int]) -> Tuple[List[str], List[List[int]]]:
        """Words start at a space, a special token or punctuation."""
        subwords, subword_tokens = self.split_tokens_on_unicode(tokens)
        words: List[str] = []
        word_tokens: List[List[int]] = []
        for subword, ids in zip(subwords, subword_tokens):
            starts_word = (ids[0] >= self.eot or subword.startswith(" ")
                           or subword.strip() in string.punctuation or not words)
            if starts_word:
                words.append(subword)
                word_tokens.append(list(ids))
            else:
                words[-1] += subword
                word_tokens[-1].extend(ids)
        return words, word_tokens


def normalize_language(language: Optional[str]) -> Optional[str]:
    """A language code from a code or a name/alias (any case); TokenizerError if unknown."""
    if language is None:
        return None
    language = language.lower()
    if language in LANGUAGES:
        return language
    if language in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[language]
    raise TokenizerError(f"Unsupported language: {language}")


@lru_cache(maxsize=None)
def _tokenizer(encoding_path: str, multilingual: bool, num_languages: int,
               language: Optional[str], task: Optional[str]) -> Tokenizer:
    return Tokenizer(get_encoding(encoding_path, num_languages), num_languages, language, task)


def get_tokenizer(encoding_path, multilingual: bool, *, num_languages: int = 99,
                  language: Optional[str] = None, task: Optional[str] = None) -> Tokenizer:
    """Like `whisper.tokenizer.get_tokenizer(multilingual, ...)`, reading the vocabulary at `encoding_path`.

    Multilingual tokenizers default to language "en" and task "transcribe"; English-only ones
    have neither (their sot_sequence is just <|startoftranscript|>).
    """
    language = normalize_language(language)
    if task not in (None, "transcribe", "translate", "lang_id"):
        # "lang_id" (language detection only) gets the translate token, as in openai-whisper
        raise TokenizerError(f"task must be 'transcribe' or 'translate', got {task!r}")
    if multilingual:
        language = language or "en"
        task = task or "transcribe"
    else:
        language = None
        task = None
    return _tokenizer(os.path.abspath(os.fspath(encoding_path)), bool(multilingual), int(num_languages),
                      language, task)
