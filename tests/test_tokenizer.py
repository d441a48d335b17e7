"""runtime.tokenizer against openai-whisper's tokenizer: ids, special tokens, text round trips."""

from __future__ import annotations

from pathlib import Path

import pytest

whisper_tokenizer = pytest.importorskip("whisper.tokenizer")

from runtime import tokenizer as rt  # noqa: E402

ASSETS = Path(whisper_tokenizer.__file__).parent / "assets"
VOCAB = {True: ASSETS / "multilingual.tiktoken", False: ASSETS / "gpt2.tiktoken"}

SPECIAL_PROPERTIES = ["eot", "sot", "transcribe", "translate", "sot_prev", "sot_lm", "no_speech", "no_timestamps",
                      "timestamp_begin", "sot_sequence", "sot_sequence_including_notimestamps",
                      "non_speech_tokens"]

TEXTS = [
    "",
    "Hello world!",
    " The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces   ",
    "Ünïcödé — “quotes” and ‘apostrophes’ …",
    "日本語のテキストと中文文本",
    "emoji 🎉🙂 and ♪ music ♪ notes",
    "Русский текст, ελληνικά, العربية, עברית",
    "numbers 3.14159 and 1,000,000 and 42%",
    "tabs\tand\nnewlines\r\n",
    "<|notaspecial|> looks special but is text",
    "'s 't 're contractions: don't, we'll, they've",
]

CONFIGS = [
    # (multilingual, num_languages, language, task)
    (True, 99, None, None),
    (True, 99, "de", "translate"),
    (True, 99, "ja", "transcribe"),
    (True, 100, None, None),
    (True, 100, "yue", "transcribe"),
    (False, 99, None, None),
]


def pair(multilingual, num_languages, language, task):
    ours = rt.get_tokenizer(VOCAB[multilingual], multilingual, num_languages=num_languages,
                            language=language, task=task)
    theirs = whisper_tokenizer.get_tokenizer(multilingual, num_languages=num_languages, language=language,
                                             task=task)
    return ours, theirs


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"ml{int(c[0])}-{c[1]}-{c[2]}-{c[3]}")
def test_special_tokens_equal_whispers(config):
    ours, theirs = pair(*config)
    for name in SPECIAL_PROPERTIES:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.special_tokens == theirs.special_tokens
    assert ours.language == theirs.language and ours.task == theirs.task
    assert ours.encoding.n_vocab == theirs.encoding.n_vocab
    # openai-whisper orders language tokens by set iteration; the mapping is what matters
    assert list(ours.all_language_tokens) == sorted(theirs.all_language_tokens)
    assert dict(zip(ours.all_language_tokens, ours.all_language_codes)) == \
        dict(zip(theirs.all_language_tokens, theirs.all_language_codes))
    assert len(ours.all_language_tokens) == config[1]
    if theirs.language is not None:
        assert ours.language_token == theirs.language_token
    else:
        with pytest.raises(ValueError):
            ours.language_token
    for code in ("en", "zh", "haw", "jw"):
        assert ours.to_language_token(code) == theirs.to_language_token(code)
    with pytest.raises(KeyError):
        ours.to_language_token("xx")


def test_known_ids():
    multilingual = rt.get_tokenizer(VOCAB[True], True)
    assert (multilingual.eot, multilingual.sot, multilingual.timestamp_begin) == (50257, 50258, 50364)
    assert multilingual.sot_sequence == (50258, 50259, 50359)  # sot, <|en|>, <|transcribe|>
    assert multilingual.no_timestamps == 50363 and multilingual.no_speech == 50362
    v3 = rt.get_tokenizer(VOCAB[True], True, num_languages=100)
    assert v3.timestamp_begin == 50365 and v3.to_language_token("yue") == 50358
    english = rt.get_tokenizer(VOCAB[False], False, language="fr", task="translate")
    assert english.sot_sequence == (50257,) and english.language is None and english.task is None
    assert english.eot == 50256 and english.timestamp_begin == 50363


@pytest.mark.parametrize("multilingual", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip(multilingual, text):
    ours, theirs = pair(multilingual, 99, None, None)
    ids = ours.encode(text)
    assert ids == theirs.encode(text)
    assert ours.decode(ids) == text == theirs.decode(ids)
    assert all(0 <= i < ours.eot for i in ids)


def test_special_text_needs_allowed_special():
    ours, theirs = pair(True, 99, None, None)
    # special-token text is refused by default, as openai-whisper's tokenizer does
    for tok in (ours, theirs):
        with pytest.raises(ValueError):
            tok.encode("a <|endoftext|> b")
    assert ours.encode("<|endoftext|>", allowed_special="all") == [ours.eot]
    assert ours.encode(" x", allowed_special={"<|endoftext|>"}) == theirs.encode(" x", allowed_special={"<|endoftext|>"})


@pytest.mark.parametrize("multilingual", [True, False])
def test_the_decoders_own_strings_skip_the_special_token_check(multilingual):
    """encode_fixed gives encode's ids without tiktoken's search for special tokens, whose regex of all of
    them is compiled on first use: ~75 ms before the first token of every transcription that took it."""
    import tiktoken.core

    from runtime.decoding import SuppressBlank

    special_token_regex = tiktoken.core._special_token_regex  # lru_cache'd: one compiled regex per token set
    special_token_regex.cache_clear()
    ours = rt.Tokenizer(rt.get_encoding(str(VOCAB[multilingual]), 99), 99, *(("en", "transcribe") if multilingual
                                                                              else (None, None)))
    suppressed = ours.non_speech_tokens
    blank = SuppressBlank(ours, sample_begin=1).blank
    assert special_token_regex.cache_info().currsize == 0
    assert blank == ours.encode(" ") + [ours.eot]
    assert special_token_regex.cache_info().currsize == 1  # encode compiles it
    assert suppressed == pair(multilingual, 99, None, None)[1].non_speech_tokens


@pytest.mark.parametrize("multilingual", [True, False])
def test_timestamps_in_decoding(multilingual):
    ours, theirs = pair(multilingual, 99, None, None)
    text = ours.encode(" Hello there, général Kenobi.")
    ids = [ours.timestamp_begin + 0] + text + [ours.timestamp_begin + 54, ours.timestamp_begin + 1500, ours.eot]
    assert ours.decode(ids) == theirs.decode(ids)
    assert "<|" not in ours.decode(ids[:-1])  # timestamps dropped
    assert ours.decode(ids) == " Hello there, général Kenobi.<|endoftext|>"
    with_ts = ours.decode_with_timestamps(ids)
    assert with_ts == theirs.decode_with_timestamps(ids)
    assert with_ts.startswith("<|0.00|> Hello") and "<|1.08|><|30.00|>" in with_ts


@pytest.mark.parametrize("language,text", [("en", " Hello, world! Isn't it nice—really?"),
                                           ("ja", "こんにちは、世界。♪"),
                                           ("zh", "你好，世界")])
def test_split_to_word_tokens(language, text):
    ours, theirs = pair(True, 99, language, "transcribe")
    ids = ours.encode(text) + [ours.eot]
    words, word_tokens = ours.split_to_word_tokens(ids)
    assert (words, word_tokens) == theirs.split_to_word_tokens(ids)
    assert "".join(words) == ours.decode_with_timestamps(ids)
    assert [t for w in word_tokens for t in w] == ids


def test_language_aliases_and_errors():
    assert rt.get_tokenizer(VOCAB[True], True, language="English").language == "en"
    assert rt.get_tokenizer(VOCAB[True], True, language="Mandarin").language == "zh"
    assert rt.get_tokenizer(VOCAB[True], True, language="castilian").sot_sequence[1] == 50262  # <|es|>
    with pytest.raises(ValueError, match="Unsupported language"):
        rt.get_tokenizer(VOCAB[True], True, language="klingon")
    with pytest.raises(ValueError):  # cantonese needs the 100-language vocabulary
        rt.get_tokenizer(VOCAB[True], True, num_languages=99, language="yue")
    with pytest.raises(ValueError, match="task"):
        rt.get_tokenizer(VOCAB[True], True, task="summarize")
    assert rt.LANGUAGES == whisper_tokenizer.LANGUAGES
    assert rt.TO_LANGUAGE_CODE == whisper_tokenizer.TO_LANGUAGE_CODE


def test_bad_vocabulary_file(tmp_path):
    with pytest.raises(rt.TokenizerError, match="cannot read"):
        rt.get_tokenizer(tmp_path / "missing.tiktoken", True)
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("this is not\na vocabulary at all\n")
    with pytest.raises(rt.TokenizerError, match="bad.tiktoken"):
        rt.get_tokenizer(bad, True)


def test_tokenizers_are_cached():
    a = rt.get_tokenizer(VOCAB[True], True, language="en")
    b = rt.get_tokenizer(str(VOCAB[True]), True, language="EN", task="transcribe")
    assert a is b


def test_a_vocabulary_fixed_on_disk_is_read_again(tmp_path):
    vocabulary = tmp_path / "gpt2.tiktoken"
    vocabulary.write_text("not base64 at all\n")
    with pytest.raises(rt.TokenizerError, match="gpt2.tiktoken"):
        rt.get_encoding(vocabulary, 99)
    vocabulary.write_bytes(VOCAB[False].read_bytes())  # a failure is not kept
    assert rt.get_encoding(vocabulary, 99).encode(" hello") == rt.get_encoding(str(VOCAB[False]), 99).encode(" hello")


def test_preloaded_encoding_is_made_once_and_shared(tmp_path, monkeypatch):
    """preload_encoding's thread and a caller that comes while it works get one Encoding, made once."""
    import threading

    vocabulary = tmp_path / "multilingual.tiktoken"
    vocabulary.write_bytes(VOCAB[True].read_bytes())
    started, release, made = threading.Event(), threading.Event(), []
    make = rt._make_encoding

    def slow_make(path, num_languages):
        made.append(path)
        started.set()
        assert release.wait(30)
        return make(path, num_languages)

    monkeypatch.setattr(rt, "_make_encoding", slow_make)
    rt.preload_encoding(str(vocabulary), 99)
    assert started.wait(30)  # the preload thread is making it
    got = []
    caller = threading.Thread(target=lambda: got.append(rt.get_encoding(vocabulary, 99)))
    caller.start()
    caller.join(0.2)
    assert caller.is_alive()  # waiting for the preload, not making its own
    release.set()
    caller.join(30)
    assert made == [str(vocabulary)]
    assert got[0] is rt.get_encoding(str(vocabulary), 99)
    assert got[0].encode(" hello world") == rt.get_encoding(str(VOCAB[True]), 99).encode(" hello world")


def test_a_failed_preload_is_raised_by_the_transcriptions_own_call(tmp_path):
    missing = tmp_path / "missing.tiktoken"
    rt.preload_encoding(str(missing), 99)
    with pytest.raises(rt.TokenizerError, match="cannot read"):
        rt.get_encoding(missing, 99)
