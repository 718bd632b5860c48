#!/usr/bin/env bash
# Install real-megatron into a virtual environment at the repository root (.venv by default).
#
#   tools/install.sh                       # CPU machine: torch 2.13.0 (CPU build), package + test extras
#   tools/install.sh --system-site-packages   # GPU cluster: reuse the image's torch (and TE, if any)
#   tools/install.sh --extras test,gpu     # choose extras (default: test)
#   tools/install.sh --with-sglang         # also SGLang's own environment (tools/install_sglang.sh)
#
# Order matters: torch goes in first and is then pinned by a constraint file, so no dependency
# can replace it with a multi-GB CUDA build. An already importable torch (a cluster image's) is kept.
# Idempotent: a stamp of the inputs makes a second run a no-op that takes about a second.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${REAL_MEGATRON_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
extras="test"
venv_flags=()
cpu_torch="2.13.0"
with_sglang=0

while [[ $# -gt 0 ]]; do
  case "$1" in
    --system-site-packages) venv_flags+=(--system-site-packages) ;;
    --extras) extras="$2"; shift ;;
    --venv) venv="$2"; shift ;;
    --python) python="$2"; shift ;;
    --with-sglang) with_sglang=1 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

stamp="$venv/.real-megatron-install"
want="$(cat "$root/pyproject.toml" "$root/tools/install.sh" | sha256sum | cut -d' ' -f1) extras=$extras"
if [[ $with_sglang == 1 ]]; then
  "$root/tools/install_sglang.sh" >/dev/null
fi
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$venv/bin/real-megatron" ]]; then
  echo "install.sh: $venv is up to date"
  exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
  echo "install.sh: creating $venv with $("$python" --version 2>&1)"
  "$python" -m venv "${venv_flags[@]}" "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

torch_version="$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
if [[ -z "$torch_version" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "install.sh: GPU found and no torch in $venv: installing PyPI's default (CUDA) torch"
    "${pip[@]}" install torch
  else
    echo "install.sh: no GPU: installing torch==$cpu_torch (CPU build)"
    "${pip[@]}" install "torch==$cpu_torch"
  fi
  torch_version="$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')"
else
  echo "install.sh: keeping the installed torch $torch_version"
fi

constraints="$venv/torch-constraint.txt"
echo "torch==$torch_version" >"$constraints"
"${pip[@]}" install -c "$constraints" -e "$root[$extras]"

"$venv/bin/real-megatron" --version
echo "$want" >"$stamp"
