#!/usr/bin/env bash
# A real SGLang server in its own virtual environment (~/.cache/real-megatron/venv-sglang-<version>).
#
# SGLang's PyPI wheel imports only beside PyPI's torch 2.14.1, while the trainer keeps its own torch
# (2.13.0+cpu on CPU machines), so the two never share an environment. The lean install below
# (about 3.5 minutes, ~6 GB) is the one measured on a CPU machine; on GPU clusters use the
# cluster's SGLang image or `pip install sglang` instead and point rollout.server_python at it.
# Idempotent: a stamp makes a second run a no-op.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="0.5.23"
# Outside the checkout, so that a machine keeps it between clean checkouts (CI caches it this way).
cache="${REAL_MEGATRON_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/real-megatron}"
venv="${SGLANG_VENV:-$cache/venv-sglang-$version}"
python="${PYTHON:-python3}"
stamp="$venv/.installed-sglang-$version"

if [[ -f "$stamp" ]] && "$venv/bin/python" -c "import sglang" 2>/dev/null; then
  echo "install_sglang.sh: $venv is up to date (sglang $version)"
  echo "$venv/bin/python"
  exit 0
fi
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install torch==2.14.1 torchvision==0.29.1
"${pip[@]}" install --no-deps "sglang==$version"
"${pip[@]}" install aiohttp anthropic blobfile build einops fastapi gguf interegular IPython llguidance \
  mistral_common msgspec ninja numpy 'openai==2.8.0' 'openai-harmony==0.0.4' orjson packaging \
  partial_json_parser pillow prometheus-client psutil pybase64 pydantic 'python-dateutil<3' \
  python-multipart pyzmq regex requests scipy 'sentencepiece==0.2.1' setproctitle tiktoken tqdm \
  'transformers==5.19.0' 'tokenizers==0.23.2' 'uvicorn>=0.51' uvloop watchfiles 'xgrammar==0.2.7' \
  xxhash zstandard distro easydict 'compressed-tensors==0.18.0' dill loguru ml_dtypes 'soundfile==0.13.1'
"$venv/bin/python" -c "import sglang; print('install_sglang.sh: sglang', sglang.__version__, 'in', '$venv')"
touch "$stamp"
echo "$venv/bin/python"
