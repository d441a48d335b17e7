"""clip_timestamps and carry_initial_prompt: the runtime against whisper.transcribe on the torch model.

Same generated checkpoint and 72 s of synthesized speech as tests/test_transcribe_parity.py, with its
recorders and near-tie rule (imported, not copied): every window must decode the same token ids
from the same prompt, and the results must have the same segments and timestamps. A divergence
where openai-whisper's own top-2 logits differ by less than TIE_EPSILON is reported as a tie.
"""

from __future__ import annotations

import pytest
from test_transcribe_parity import (
    TIE_EPSILON,
    assert_same_segments,
    first_divergence,
    record_ours,
    record_reference,
)

PROMPT = "A recording about trains, bread and stars."
# 210 tokens: with carry_initial_prompt only 223 - 210 = 13 tokens of earlier text fit after it
LONG_PROMPT = " ".join(["The train to the coast leaves from platform four every hour on the hour."] * 14)
PROMPT_LIMIT = 448 // 2 - 1  # tiny's n_text_ctx // 2 - 1: the most prompt tokens a window gets

CASES = {
    # two clips, timestamps on and conditioning on (openai-whisper's defaults)
    "clips": dict(clip_timestamps="3,20,35,60"),
    "clips-list-unconditioned": dict(clip_timestamps=[3.0, 20.0, 35.0, 60.0], condition_on_previous_text=False),
    # windows that cannot depend on each other: decoded as one batch per clip; an odd count of
    # times leaves the last clip open to the end of the file
    "clips-batched": dict(clip_timestamps="1.5,64,66", without_timestamps=True, condition_on_previous_text=False),
    "carry-prompt-conditioned": dict(initial_prompt=PROMPT, carry_initial_prompt=True),
    "carry-prompt-unconditioned": dict(initial_prompt=PROMPT, carry_initial_prompt=True,
                                       condition_on_previous_text=False),
    # every window's prompt is the initial prompt then: the batch path must stay off, not drop it
    "carry-prompt-no-timestamps-unconditioned": dict(initial_prompt=PROMPT, carry_initial_prompt=True,
                                                     without_timestamps=True, condition_on_previous_text=False),
    # the carried prompt plus earlier text is cut to PROMPT_LIMIT tokens, keeping the initial prompt
    "carry-long-prompt-conditioned": dict(initial_prompt=LONG_PROMPT, carry_initial_prompt=True),
}


def record_prompts(monkeypatch) -> tuple[list[list[int]], list[list[int]]]:
    """The prompt each decode call got, openai-whisper's and ours (on top of the token recorders)."""
    import whisper.model

    import runtime.longform

    reference_prompts: list[list[int]] = []
    our_prompts: list[list[int]] = []
    reference_decode = whisper.model.Whisper.decode
    our_decode = runtime.longform.decode

    def reference(self, mel, options):
        reference_prompts.append(list(options.prompt or []))
        return reference_decode(self, mel, options)

    def ours(model, mel, options, *args, **kwargs):
        our_prompts.append(list(options.prompt or []))
        return our_decode(model, mel, options, *args, **kwargs)

    monkeypatch.setattr(whisper.model.Whisper, "decode", reference)
    monkeypatch.setattr(runtime.longform, "decode", ours)
    return reference_prompts, our_prompts


@pytest.mark.parametrize("case", list(CASES))
def test_option_matches_openai_whisper(case, monkeypatch, tiny_runtime, torch_tiny, speech_72s, record_property):
    import whisper

    import runtime

    options = dict(CASES[case], language="en", temperature=0.0)
    reference_calls = record_reference(monkeypatch)
    our_calls, batch_sizes = record_ours(monkeypatch)
    reference_prompts, our_prompts = record_prompts(monkeypatch)
    reference = whisper.transcribe(torch_tiny, str(speech_72s), fp16=False, verbose=None, **options)
    ours = runtime.transcribe(tiny_runtime, speech_72s, verbose=None, **options)

    if case == "clips-batched":
        # clip 1 (1.5-64 s) has three windows on its grid, decoded together; clip 2 one window
        assert batch_sizes[0] == 3, batch_sizes
        assert len(our_prompts) == len(batch_sizes)
    else:
        assert set(batch_sizes) == {1}, batch_sizes

    compared = sum(len(c.tokens) for c in reference_calls)
    tie = first_divergence(reference_calls, our_calls)
    record_property("tokens_compared", compared)
    record_property("tie", None if tie is None else tie.__dict__)
    if tie is not None:
        print(f"\n{case}: near-tie at window {tie.window}, token {tie.index}: openai-whisper's top-2 logits "
              f"differ by {tie.margin:.2e} < {TIE_EPSILON}; it chose {tie.reference_token}, we chose {tie.our_token}")
        return
    print(f"\n{case}: {compared} tokens in {len(reference_calls)} windows, identical; "
          f"prompt lengths {[len(p) for p in reference_prompts]}")

    if case != "clips-batched":
        assert our_prompts == reference_prompts
    check_case_exercised(case, options, reference, reference_prompts)
    assert ours["language"] == reference["language"]
    assert ours["text"] == reference["text"]
    assert_same_segments(ours, reference)


def check_case_exercised(case: str, options: dict, reference: dict, prompts: list[list[int]]) -> None:
    """Each case must reach what it is named for in openai-whisper's own run, or it proves nothing."""
    from whisper.tokenizer import get_tokenizer

    tokenizer = get_tokenizer(True, language="en", task="transcribe")
    if "clip_timestamps" in options:
        seeks = sorted({segment["seek"] for segment in reference["segments"]})
        clips = options["clip_timestamps"]
        times = [round(float(t) * 100) for t in (clips.split(",") if isinstance(clips, str) else clips)]
        if len(times) % 2:
            times.append(float("inf"))
        # a window starts at each clip's start, and every window lies inside a clip
        for start, end in zip(times[::2], times[1::2]):
            assert start in seeks, (start, seeks)
        assert all(any(start <= seek < end for start, end in zip(times[::2], times[1::2])) for seek in seeks), seeks
    if options.get("carry_initial_prompt"):
        initial = tokenizer.encode(" " + options["initial_prompt"].strip())
        assert len(prompts) >= 2 and all(prompt[:len(initial)] == initial for prompt in prompts), \
            "every window's prompt should start with the initial prompt"
        if options.get("condition_on_previous_text", True):
            assert any(len(prompt) > len(initial) for prompt in prompts[1:]), "earlier text should follow it"
        else:
            assert all(prompt == initial for prompt in prompts)
        if options["initial_prompt"] == LONG_PROMPT:
            assert len(initial) > PROMPT_LIMIT // 2
            assert max(len(prompt) for prompt in prompts) == PROMPT_LIMIT, "the prompt should have been cut"


def test_cli_takes_both_options(tiny_model_dir, speech_72s, tmp_path):
    """The CLI passes --clip-timestamps and --carry-initial-prompt through: its JSON equals the API's."""
    import json

    from conftest import run_tool

    import runtime

    out = tmp_path / "out"
    run_tool("runtime", "transcribe", str(speech_72s), "--model", str(tiny_model_dir), "--output-dir", str(out),
             "--output-format", "json", "--language", "en", "--temperature-increment-on-fallback", "none",
             "--verbose", "False", "--clip-timestamps", "3,20,35,60", "--initial-prompt", PROMPT,
             "--carry-initial-prompt", "True", "--beam-size", "none")  # greedy, as the API's default
    from_cli = json.loads((out / f"{speech_72s.stem}.json").read_text())
    from_api = runtime.transcribe(tiny_model_dir, speech_72s, verbose=None, language="en", temperature=0.0,
                                  clip_timestamps="3,20,35,60", initial_prompt=PROMPT, carry_initial_prompt=True)
    assert from_cli["segments"], from_cli
    assert [s["tokens"] for s in from_cli["segments"]] == [s["tokens"] for s in from_api["segments"]]
    assert [(s["start"], s["end"]) for s in from_cli["segments"]] == [(s["start"], s["end"])
                                                                      for s in from_api["segments"]]
    assert min(s["seek"] for s in from_cli["segments"]) == 300


@pytest.mark.parametrize("value,needle", [("3,abc", "'abc'"), ("-3,10", "'-3'"), ("3,nan", "'nan'")])
def test_cli_rejects_bad_clip_timestamps(tiny_model_dir, speech_72s, tmp_path, value, needle):
    from conftest import run_tool

    result = run_tool("runtime", "transcribe", str(speech_72s), "--model", str(tiny_model_dir),
                      "--output-dir", str(tmp_path / "out"), f"--clip-timestamps={value}", check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --clip-timestamps") and needle in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
