#!/usr/bin/env bash
# The GPU check: on one GPU, no internet, in well under 20 minutes. Make gpu_bundle/ first
# (tools/gpu_bundle.sh, on a machine with internet) and carry it with the checkout.
#
#   tools/gpu_check.sh [--cpu-dry-run] [--bundle gpu_bundle] [--out gpu_check_out]
#
# (a) every Triton kernel compiled, against the torch reference: fp32 and bf16, forward and
#     backward, entropy, T x V > 2^31, -inf columns, empty groups (pytest -m gpu tests/test_gpu.py);
#     then tools/bench_kernels.py --device cuda with bandwidth as a percentage of HBM peak
# (b) the actor on CUDA (local spec, NCCL, world size 1): tools/parity_step.py against the CPU
#     reference in the bundle, fp32 with TF32 off, max relative difference <= 1e-5
# (c) one bf16 step of a random DeepSeek-R1-Distill-Qwen-1.5B-shaped model on 8k-token rollouts:
#     s̄ = 0 at the first update, finite loss and grad norm, tokens/s, MFU, peak memory against the
#     --dry-run estimate (tools/gpu_step.py)
# (d) checkpoint save, load and resume on CUDA: 2 steps == 1 step + checkpoint + new process + 1
#     step, bit for bit (tools/parity_step.py --save/--load)
# (e) logits of the megatron model against transformers' on CUDA (tools/check_parity.py)
# (f) the actor's data path at the real vocabulary: padded rows + GPTModel's logits against packed
#     rows + the fused output layer, tokens/s and peak memory (tools/bench_actor.py)
# With Transformer Engine installed, (b)-(e) also run with its layer spec (it is chosen
# automatically); without it the local spec runs.
# --cpu-dry-run: all of it on CPU at toy sizes (Triton interpreted), to check the script itself.
# Results: a line per item (PASS/FAIL) and every figure in OUT/gpu_check.log; exit 1 if any failed.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bundle="$root/gpu_bundle" out="$root/gpu_check_out" dry=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu-dry-run) dry=1 ;;
    --bundle) bundle="$(realpath "$2")"; shift ;;
    --out) out="$(realpath -m "$2")"; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out"
logf="$out/gpu_check.log"; : >"$logf"
log() { echo "$*" | tee -a "$logf"; }
failed=0
item() {  # item NAME COMMAND...: run, log its output, record PASS/FAIL
  local name=$1; shift
  log "== $name"; echo "$ $*" >>"$logf"
  local t0=$SECONDS
  if "$@" >>"$logf" 2>&1; then log "PASS $name ($((SECONDS - t0)) s)"; else log "FAIL $name ($((SECONDS - t0)) s)"; failed=1; fi
}

# Python: the repo's venv where it exists (CPU machine), else the machine's python plus the bundle
py="$root/.venv/bin/python"
if [[ ! -x $py ]]; then
  py="$out/venv/bin/python"
  if [[ ! -x $py ]]; then
    python3 -m venv --system-site-packages "$out/venv" || exit 2
    "$py" -m pip install --quiet --no-index --find-links "$bundle/wheels" megatron-core packaging psutil pyyaml tqdm \
      pytest pytest-timeout \
      || { echo "gpu_check.sh: installing from $bundle/wheels failed (run tools/gpu_bundle.sh)" >&2; exit 2; }
  fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" NVIDIA_TF32_OVERRIDE=0
[[ -f $bundle/parity_cpu.safetensors ]] || { echo "gpu_check.sh: no $bundle/parity_cpu.safetensors (run tools/gpu_bundle.sh)" >&2; exit 2; }

if (( dry )); then
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1 REAL_MEGATRON_GPU_DRY_RUN=1
  log "gpu_check: CPU dry run (toy sizes, Triton interpreted): $("$py" -c 'import torch; print("torch", torch.__version__)')"
  bench=(--device cpu --tokens 256 --hidden 128 --vocab 8192) step=(--tiny)
  actor=(--device cpu --hidden 64 --layers 1 --groups 1 --group-size 2)
else
  "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || { echo "gpu_check.sh: no CUDA device (use --cpu-dry-run)" >&2; exit 2; }
  unset TRITON_INTERPRET
  log "gpu_check: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)"
  log "$("$py" -c 'import torch, triton, megatron.core as m; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "megatron-core", m.__version__)')"
  name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  case "$name" in *H200*) hbm=4800 ;; *H100*PCIe*) hbm=2000 ;; *H100*) hbm=3350 ;; *A100*80GB*) hbm=2039 ;; *A100*) hbm=1555 ;; *) hbm= ;; esac
  bench=(--device cuda --dtype bfloat16 ${hbm:+--hbm-gbps $hbm}) step=()
  actor=(--device cuda --dtype bfloat16 --hidden 1536 --layers 4 --groups 8 --group-size 8 --max-tokens 16384)
fi

item "(a) Triton kernels against the torch reference" "$py" -m pytest -q -m gpu -p no:cacheprovider "$root/tests/test_gpu.py"
item "(a) kernel benchmark" "$py" "$root/tools/bench_kernels.py" "${bench[@]}"
compare() {  # compare A B TOLERANCE: max relative difference over all tensors
  "$py" - "$@" <<'PY'
import sys
from safetensors.torch import load_file
a, b, tol = load_file(sys.argv[1]), load_file(sys.argv[2]), float(sys.argv[3])
assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
worst = max(float((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max().clamp_min(1e-30)) for k in a)
print(f"max relative difference over {len(a)} tensors: {worst:.3e} (tolerance {tol:g})")
sys.exit(0 if worst <= tol else 1)
PY
}
parity() { "$py" "$root/tools/parity_step.py" "$@"; }
item "(b) actor step against the CPU reference" bash -c "$(declare -f compare parity); py=$py root=$root
  parity --steps 1 --out $out/parity_device.safetensors && compare $out/parity_device.safetensors $bundle/parity_cpu.safetensors 1e-5"
item "(c) bf16 step at DeepSeek-R1-Distill-Qwen-1.5B shape, 8k tokens" "$py" "$root/tools/gpu_step.py" "${step[@]}" --json "$out/gpu_step.json"
item "(d) checkpoint resume bit-identical" bash -c "$(declare -f compare parity); py=$py root=$root
  rm -rf $out/ckpt && parity --steps 2 --out $out/straight.safetensors && parity --steps 1 --save $out/ckpt --out $out/half.safetensors \
  && parity --steps 1 --load $out/ckpt --out $out/resumed.safetensors && compare $out/resumed.safetensors $out/straight.safetensors 0"
item "(e) logits against transformers" "$py" "$root/tools/check_parity.py" --hf "$bundle/tiny_hf" --tolerance 1e-4
item "(f) actor data path benchmark" "$py" "$root/tools/bench_actor.py" "${actor[@]}"
log "gpu_check: $([[ $failed == 0 ]] && echo 'all passed' || echo 'FAILED (see above)'); figures in $logf"
exit $failed
