#!/usr/bin/env bash
# The GPU check: one command on one GPU, no internet, within a fixed time. Make gpu_bundle/ first
# (tools/gpu_bundle.sh, on a machine with internet) and carry it with the checkout.
#
#   tools/gpu_check.sh [--cpu-dry-run] [--bundle DIR] [--out DIR] [--python PY] [--budget-s 510]
#
# Items, most informative first; each has a time limit, and one that would pass the global
# deadline (--budget-s from the start) is logged SKIP instead of started:
# (a) every Triton kernel compiled, against the torch reference: fp32 and bf16, forward and
#     backward, entropy, T x V > 2^31, -inf columns, empty groups (pytest -m gpu tests/gpu/test_gpu.py)
# (b) the actor on CUDA (local spec, NCCL, world size 1): tools/parity_step.py against the CPU
#     reference in the bundle, fp32 with TF32 off, max relative difference <= 1e-5
# (c) one bf16 step of a random DeepSeek-R1-Distill-Qwen-1.5B-shaped model on 8k-token rollouts:
#     s̄ = 0 at the first update, finite loss and grad norm, tokens/s, MFU, peak memory against the
#     --dry-run estimate (tools/gpu_step.py)
# (e) logits of the megatron model against transformers' on CUDA (tools/check_parity.py)
# (d) checkpoint save, load and resume: 2 steps == 1 step + checkpoint + new process + 1 step;
#     bit for bit on CPU, max relative difference <= 1e-6 on CUDA (the Triton segment sums use
#     atomic adds, whose order, and so the last bits of a float32 sum, vary between runs)
# (a) kernel benchmark: compiled kernels, best of repeats after a warm-up (tools/bench_kernels.py)
# (f) the actor's data path at the real vocabulary: padded rows + GPTModel's logits against packed
#     rows + the fused output layer, tokens/s and peak memory (tools/bench_actor.py)
#
# Python: --python, else the checkout's .venv, else `python3`. It must import torch, transformers,
# safetensors and numpy (and triton on a GPU); what it lacks of the bundle's wheels (megatron-core,
# pytest, ...) is installed with `pip install --no-index --no-deps --target` into a scratch folder
# under /tmp and put on PYTHONPATH: no virtual environment is made (a venv made from a python that
# is itself a venv does not see that venv's packages).
# Output: OUT/gpu_check.log, appended as each item ends (PASS / FAIL / SKIP, seconds, its figures,
# then its whole output), so a run cut short keeps what finished; OUT/gpu_step.json and
# OUT/bench_kernels.json. Scratch files (checkpoints, parameter files) go under /tmp.
# Exit 0 when every item passed, 1 if any failed or was skipped, 2 when the machine lacks something.
# --cpu-dry-run: all of it on CPU at toy sizes (Triton interpreted), to check the script itself.
set -uo pipefail
export PYTHONUNBUFFERED=1
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bundle="$root/gpu_bundle" out="$root/gpu_check_out" dry=0 py="" budget=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu-dry-run) dry=1 ;;
    --bundle) bundle="$(realpath -m "$2")"; shift ;;
    --out) out="$(realpath -m "$2")"; shift ;;
    --python) py="$2"; shift ;;
    --budget-s) budget="$2"; shift ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
# a CPU dry run is slower per item (interpreted Triton, 2 cores): its limits are scaled, not its deadline's purpose
scale=1; (( dry )) && scale=6
budget=${budget:-$((510 * scale))}
deadline=$((SECONDS + budget))
mkdir -p "$out"
logf="$out/gpu_check.log"; : >"$logf"
log() { echo "$*" | tee -a "$logf"; }
die() { log "gpu_check.sh: $*"; exit 2; }
scratch="$(mktemp -d "${TMPDIR:-/tmp}/real-megatron-gpu-check.XXXXXX")"

# --- the interpreter and what it lacks -----------------------------------------------------------
if [[ -z $py ]]; then
  py="$root/.venv/bin/python"; [[ -x $py ]] || py="$(command -v python3)"
fi
[[ -x $py ]] || die "no python at '$py' (give one with --python)"
need=(torch transformers safetensors numpy); (( dry )) || need+=(triton)
missing=$("$py" - "${need[@]}" <<'PY'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
PY
) || die "$py does not run"
[[ -z $missing ]] || die "$py lacks $missing: run the check with a python that has torch (CUDA), triton, transformers, safetensors and numpy (--python)"
if ! "$py" -c 'import megatron.core, yaml, tqdm, psutil, pytest' 2>/dev/null; then
  wheels=("$bundle"/wheels/*.whl)
  [[ -e ${wheels[0]} ]] || die "$py has no megatron-core and $bundle/wheels holds no wheels: run tools/gpu_bundle.sh (with --python-version $("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')) and carry gpu_bundle/ with the checkout"
  "$py" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --target "$scratch/site" "${wheels[@]}" >>"$logf" 2>&1 \
    || die "installing $bundle/wheels into $scratch/site failed (see $logf): were they made for this python's version? (tools/gpu_bundle.sh --python-version)"
  export PYTHONPATH="$scratch/site${PYTHONPATH:+:$PYTHONPATH}"
  log "gpu_check: installed $(ls "$bundle/wheels" | sed 's/-py3.*\|-cp3.*//' | tr '\n' ' ')into $scratch/site"
fi
"$py" -c 'import megatron.core, yaml, tqdm, psutil, pytest' 2>>"$logf" || die "$py still cannot import megatron.core, yaml, tqdm, psutil and pytest (see $logf)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" NVIDIA_TF32_OVERRIDE=0
[[ -f $bundle/parity_cpu.safetensors && -d $bundle/tiny_hf ]] || die "no CPU references in $bundle (run tools/gpu_bundle.sh)"

versions() { "$py" -c 'import sys, torch, transformers, megatron.core as m
try:
    import triton; t = triton.__version__
except ImportError:
    t = "none"
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", t,
      "transformers", transformers.__version__, "megatron-core", m.__version__)'; }
if (( dry )); then
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1 REAL_MEGATRON_GPU_DRY_RUN=1
  log "gpu_check: CPU dry run (toy sizes, Triton interpreted); budget $budget s"
  bench=(--device cpu --tokens 256 --hidden 128 --vocab 8192) step=(--tiny) resume_tol=0
  actor=(--device cpu --hidden 64 --layers 1 --groups 1 --group-size 2)
else
  "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || die "no CUDA device (use --cpu-dry-run)"
  unset TRITON_INTERPRET
  name=$("$py" -c 'import torch; print(torch.cuda.get_device_name())')
  log "gpu_check: $name, $(nvidia-smi --query-gpu=driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1); budget $budget s"
  case "$name" in *H200*) hbm=4800 ;; *H100*PCIe*) hbm=2000 ;; *H100*) hbm=3350 ;; *A100*80GB*) hbm=2039 ;; *A100*) hbm=1555 ;; *) hbm= ;; esac
  bench=(--device cuda --dtype bfloat16 --repeats 5 ${hbm:+--hbm-gbps $hbm}) step=() resume_tol=1e-6
  actor=(--device cuda --dtype bfloat16 --hidden 1536 --layers 4 --groups 8 --group-size 8 --max-tokens 16384)
fi
log "gpu_check: $(versions 2>&1 | tail -1)"

# --- items ----------------------------------------------------------------------------------------
failed=0
item() {  # item NAME EXPECTED_S LIMIT_S FIGURES_REGEX COMMAND...
  local name=$1 expect=$(($2 * scale)) limit=$(($3 * scale)) figures=$4; shift 4
  local left=$((deadline - SECONDS))
  if (( left < expect )); then
    log "SKIP $name: ${left} s left of the ${budget} s budget, it needs about ${expect} s"; failed=1; return
  fi
  (( limit > left )) && limit=$left
  local t0=$SECONDS itemlog="$scratch/item.log" rc
  timeout --kill-after=15 "$limit" "$@" >"$itemlog" 2>&1; rc=$?
  local took=$((SECONDS - t0)) found
  found=$(grep -E "$figures" "$itemlog" | tail -4 | tr -s ' ' | paste -sd ';' -)
  if (( rc == 0 )); then
    log "PASS $name ($took s)${found:+: $found}"
  elif (( rc == 124 || rc == 137 )); then
    log "FAIL $name: timed out after $limit s${found:+: $found}"; failed=1
  else
    log "FAIL $name (exit $rc, $took s)${found:+: $found}"; failed=1
    tail -5 "$itemlog" | sed 's/^/    /'
  fi
  { echo "---- output of $name: $*"; cat "$itemlog"; echo "----"; } >>"$logf"
}
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
export -f compare parity; export py root scratch

item "(a) Triton kernels against the torch reference" 60 180 "passed|failed" \
  "$py" -m pytest -q -m gpu -p no:cacheprovider "$root/tests/gpu/test_gpu.py"
item "(b) actor step against the CPU reference" 30 120 "max relative" bash -c \
  "parity --steps 1 --out $scratch/parity_device.safetensors && compare $scratch/parity_device.safetensors $bundle/parity_cpu.safetensors 1e-5"
item "(c) bf16 step at DeepSeek-R1-Distill-Qwen-1.5B shape, 8k tokens" 90 200 "^(tokens_per_s|mfu|peak_memory_gb|estimate_gb|FAIL) " \
  "$py" "$root/tools/gpu_step.py" "${step[@]}" --json "$out/gpu_step.json"
item "(e) logits against transformers" 30 120 "max" \
  "$py" "$root/tools/check_parity.py" --hf "$bundle/tiny_hf" --tolerance 1e-4
item "(d) checkpoint resume" 45 150 "max relative" bash -c \
  "parity --steps 2 --out $scratch/straight.safetensors && parity --steps 1 --save $scratch/ckpt --out $scratch/half.safetensors \
   && parity --steps 1 --load $scratch/ckpt --out $scratch/resumed.safetensors && compare $scratch/resumed.safetensors $scratch/straight.safetensors $resume_tol"
item "(a) kernel benchmark" 45 150 "^(naive|token|linear) " \
  "$py" "$root/tools/bench_kernels.py" "${bench[@]}" --json "$out/bench_kernels.json"
item "(f) actor data path benchmark" 60 180 "^\| (tokens/s|peak memory GB)" \
  "$py" "$root/tools/bench_actor.py" "${actor[@]}"
rm -rf "$scratch"
log "gpu_check: $([[ $failed == 0 ]] && echo 'all passed' || echo 'NOT ALL PASSED (see above)') in $SECONDS s; figures in $logf"
exit $failed
