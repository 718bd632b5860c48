#!/usr/bin/env bash
# megatron-core's Python sources for a release this machine's Python has no wheel for: clusters with
# Python 3.12 install 0.19.x, whose only wheel is cp312, but whose Python code imports and runs on 3.11
# (the one compiled module, megatron/core/datasets/helpers_cpp, is never used here). Downloads the
# cp312 wheel into the cache and unzips it once; prints the folder. That folder on PYTHONPATH, ahead
# of the venv's 0.16.1, is the second test environment (tests/integration/test_megatron_core_019.py).
#
#   tools/mcore_sources.sh [VERSION]      # default 0.19.2
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,8p' "$0"; exit 0 ;; esac
version="${1:-0.19.2}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$root/.venv/bin/python"
[[ -x $py ]] || py=python3
cache="${REAL_MEGATRON_CACHE:-$HOME/.cache/real-megatron}"
dest="$cache/megatron-core-$version"
stamp="$dest/.unpacked"
if [[ ! -f $stamp ]]; then
  wheels="$cache/wheels"
  mkdir -p "$wheels"
  "$py" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --platform manylinux_2_28_x86_64 --dest "$wheels" "megatron-core==$version" >&2
  wheel=$(ls "$wheels"/megatron_core-"$version"-*.whl 2>/dev/null | head -n1)
  [[ -n $wheel ]] || { echo "mcore_sources.sh: no megatron-core $version wheel in $wheels" >&2; exit 1; }
  rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
  "$py" -m zipfile -e "$wheel" "$dest.tmp"
  [[ -f $dest.tmp/megatron/core/__init__.py ]] || { echo "mcore_sources.sh: $wheel holds no megatron/core" >&2; exit 1; }
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
  basename "$wheel" > "$stamp"
fi
echo "$dest"
