#!/usr/bin/env bash
# Stage what er-train needs on the device beyond the image and the SGLang kit (issue 11's GPU runs): Ray
# (79 MB, over one call's 64 MiB, so split in two), omegaconf + antlr4, jsonschema's stack (a Ray
# requirement the image lacks), and the GSM8K / MATH prompt files. Here (with PyPI):
#     bash scripts/stage_pydeps.sh            -> .pydeps/c0, .pydeps/c1 (git-ignored, each < 60 MiB)
# There, two calls within the warm window (scripts/device_run.sh step pydeps installs once both are in):
#     run(command="STEPS=pydeps bash scripts/device_run.sh", carry=[".pydeps/c0"])
#     run(command="STEPS=pydeps bash scripts/device_run.sh", carry=[".pydeps/c1"])
# wandb is not staged: the tracker trains on without it (metrics.jsonl is the record); pass logging.wandb=disabled.
set -euo pipefail
cd "$(dirname "$0")/.."
RAY=${RAY_VERSION:-2.60.0}
rm -rf .pydeps && mkdir -p .pydeps/dl .pydeps/c0 .pydeps/c1
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d .pydeps/dl "ray==$RAY" omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 jsonschema \
    jsonschema-specifications referencing rpds-py
ray_whl=$(ls .pydeps/dl/ray-*.whl)
half=$(( ($(stat -c %s "$ray_whl") + 1) / 2 ))
split -b "$half" -d -a 1 "$ray_whl" .pydeps/dl/ray.part
mv .pydeps/dl/ray.part0 .pydeps/c0/ && mv .pydeps/dl/ray.part1 .pydeps/c1/
(cd .pydeps/dl && sha256sum "$(basename "$ray_whl")") > .pydeps/c0/ray.sha256
mv .pydeps/dl/*.whl .pydeps/c0/ 2>/dev/null || true
rm -f .pydeps/c0/ray-*.whl && rm -rf .pydeps/dl
python3 scripts/prepare_data.py --out .pydeps/c1 --sets gsm8k_train math_hard_train > /dev/null
du -sh .pydeps/c0 .pydeps/c1
