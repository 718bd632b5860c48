#!/usr/bin/env bash
# What tools/gpu_check.sh needs on a single-GPU machine without internet, made here (any machine
# with internet and the CPU install): the newest megatron-core wheel the project allows for that
# machine's Python (3.12: 0.19.x; 3.11: 0.16.1), the small packages the check imports beside it
# (pytest, psutil, pyyaml, tqdm, packaging), and reference files computed on this CPU. Everything
# goes to gpu_bundle/ (git-ignored, about 8 MB): carry it with the checkout.
#
#   tools/gpu_bundle.sh [--python-version 3.12] [--out gpu_bundle]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$root/gpu_bundle" pyver=3.12
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python-version) pyver="$2"; shift ;;
    --out) out="$2"; shift ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "gpu_bundle.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift
done
py="$root/.venv/bin/python"
[[ -x $py ]] || { echo "gpu_bundle.sh: run tools/install.sh first (the CPU references need it)" >&2; exit 2; }
rm -rf "$out/wheels"; mkdir -p "$out/wheels"
# the project's own range (pyproject.toml): pip picks the newest release with a wheel for that Python
mcore=$("$py" -c 'import re, sys; print(re.search(r"\"(megatron-core[^\"]*)\"", open(sys.argv[1]).read()).group(1))' "$root/pyproject.toml")
# --no-deps: the GPU machine has torch, numpy, transformers and safetensors; the rest is here
# (megatron-core needs packaging >= 24.2; the check's kernel tests need pytest)
"$py" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --dest "$out/wheels" \
  --python-version "$pyver" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 "$mcore" "packaging>=24.2" psutil pyyaml tqdm \
  pytest pytest-timeout pluggy iniconfig pygments
# CPU references: a tiny model's initial weights (HF) and its parameters after one REAL update; a
# tiny Qwen3-MoE (tests/support/moe_models.py) and its parameters after one update with routing replay
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
"$py" "$root/tools/parity_step.py" --steps 0 --out "$out/initial.safetensors" --write-hf "$out/tiny_hf" >/dev/null 2>&1
"$py" "$root/tools/parity_step.py" --steps 1 --out "$out/parity_cpu.safetensors" >/dev/null 2>&1
rm -rf "$out/moe_hf"
PYTHONPATH="$root/tests/support" "$py" -c 'import sys; from moe_models import make_moe_checkpoint; make_moe_checkpoint(sys.argv[1], "qwen3_moe")' "$out/moe_hf" >/dev/null 2>&1
"$py" "$root/tools/parity_step.py" --hf "$out/moe_hf" --routing-replay --require-zero-s --steps 1 --out "$out/parity_cpu_moe.safetensors" >/dev/null 2>&1
echo "gpu_bundle.sh: wrote $out ($(du -sh "$out" | cut -f1)): $(ls "$out/wheels" | tr '\n' ' ')"
