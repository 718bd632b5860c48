#!/usr/bin/env bash
# The GPU check: one command on one GPU, no internet, within a fixed time. Make gpu_bundle/ first
# (tools/gpu_bundle.sh, on a machine with internet) and carry it with the checkout.
#
#   tools/gpu_check.sh [--cpu-dry-run] [--bundle DIR] [--out DIR] [--python PY] [--budget-s 510]
#
# Items, most informative first; each has a time limit, and one that would pass the global
# deadline (--budget-s from the start) is logged SKIP instead of started. Sized for one H100 80 GB
# (about 78 GiB usable); docs/GPU.md defines every figure. To add an item, add one `item` line.
# (a) every Triton kernel compiled, against the torch reference: fp32 and bf16, forward and
#     backward, entropy, T x V > 2^31, -inf columns, empty groups (pytest -m gpu tests/gpu/test_gpu.py)
# (b) the actor on CUDA (local spec, NCCL, world size 1): tools/parity_step.py, fp32 with TF32 off,
#     against the bundle's CPU reference AND this machine's CPU with this machine's megatron-core,
#     max relative difference <= 1e-5, naming the tensor that differs most
# (c) two bf16 steps of a random DeepSeek-R1-Distill-Qwen-1.5B-shaped model on 2 x 8k-token
#     rollouts, full recompute, the second timed: s̄ = 0 at the first update, finite loss and grad
#     norm, tokens/s, MFU, peak allocated/reserved GiB (Adam's state included) against the estimate
#     of the same run; then one step counting host syncs per micro-batch (tools/gpu_step.py)
# (g) the same with block recompute of 14 of 28 layers: measured peak against the estimate
# (h) a tiny Qwen3-MoE step with routing replay on CUDA against its CPU reference, s̄ = 0 at the
#     first update
# (e) logits of the megatron model against transformers' on CUDA (tools/check_parity.py)
# (d) checkpoint save, load and resume in the optimizer format `auto` picks at 1.5B and 7B:
#     2 steps == 1 step + checkpoint + new process + 1 step; bit for bit on CPU, max relative
#     difference <= 1e-6 on CUDA (the Triton segment sums' atomic adds vary a float32 sum's last bits)
# (i) the colocated layout's actor offload: one bf16 rank of the 1.5B shape after a step, its
#     gradients, optimizer state and parameters to host memory and back (actor/offload.py): seconds of
#     each move, GPU memory freed against what the actor holds, bit-identical after the cycle
#     (tools/gpu_offload_check.py)
# (a) kernel benchmark: matmul TFLOP/s against the card's peak, HBM bandwidth of the bandwidth-bound
#     kernels alone (tools/bench_kernels.py)
# (f) the actor's data path at the real vocabulary: padded rows + GPTModel's logits against packed
#     rows + the fused output layer, tokens/s and peak memory (tools/bench_actor.py)
#
# Python: --python, else the checkout's .venv, else `python3`. It must import torch, transformers,
# safetensors and numpy (and triton on a GPU); the bundle's wheels whose modules it lacks (and only
# those: megatron-core, pytest, pytest-timeout, ...) are installed with `pip install --no-index
# --no-deps --target` into a scratch folder under /tmp and put on PYTHONPATH: no virtual environment
# is made (a venv made from a python that is itself a venv does not see that venv's packages).
# Output: OUT/gpu_check.log, appended as each item ends (PASS / FAIL / SKIP, seconds, its figures,
# then its whole output), so a run cut short keeps what finished; OUT/gpu_step.json,
# OUT/gpu_step_block.json, OUT/gpu_offload.json and OUT/bench_kernels.json. Scratch files (checkpoints, parameter files) go under /tmp.
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
    -h|--help) sed -n '2,44p' "$0"; exit 0 ;;
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
# the bundled wheels whose module this python lacks (or has older than the bundle needs: megatron-core
# needs packaging >= 24.2): only those are installed, none over the machine's own packages
lacking=()
while IFS= read -r w; do [[ -n $w ]] && lacking+=("$w"); done < <("$py" - "$bundle"/wheels/*.whl <<'PY'
import importlib.metadata as md, importlib.util as u, os, sys
MODULE = {"megatron_core": "megatron", "pyyaml": "yaml"}
MINIMUM = {"packaging": (24, 2)}
for wheel in sys.argv[1:]:
    if not os.path.exists(wheel):
        continue
    dist = os.path.basename(wheel).split("-")[0].lower()
    if u.find_spec(MODULE.get(dist, dist)) is None:
        print(wheel)
    elif dist in MINIMUM:
        have = tuple(int(x) for x in md.version(dist).split(".")[:2] if x.isdigit())
        if have < MINIMUM[dist]:
            print(wheel)
PY
)
if (( ${#lacking[@]} )); then
  "$py" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --target "$scratch/site" "${lacking[@]}" >>"$logf" 2>&1 \
    || die "installing $bundle/wheels into $scratch/site failed (see $logf): were they made for this python's version? (tools/gpu_bundle.sh --python-version)"
  export PYTHONPATH="$scratch/site${PYTHONPATH:+:$PYTHONPATH}"
  log "gpu_check: installed $(printf '%s\n' "${lacking[@]##*/}" | sed 's/-py3.*\|-cp3.*//' | tr '\n' ' ')into $scratch/site"
elif ! "$py" -c 'import megatron.core' 2>/dev/null; then
  die "$py has no megatron-core and $bundle/wheels holds no wheels: run tools/gpu_bundle.sh (with --python-version $("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')) and carry gpu_bundle/ with the checkout"
fi
"$py" -W ignore -c 'import megatron.core, yaml, tqdm, psutil, pytest, pytest_timeout' 2>>"$logf" || die "$py still cannot import megatron.core, yaml, tqdm, psutil, pytest and pytest_timeout (see $logf)"
# as real runs set it (actor/distributed.py); the kernels' value checks as in a real run (off in the
# training step; the kernel tests call the kernels directly, with them on)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" NVIDIA_TF32_OVERRIDE=0 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
unset REAL_MEGATRON_KERNEL_CHECKS
for f in parity_cpu.safetensors parity_cpu_moe.safetensors tiny_hf moe_hf; do
  [[ -e $bundle/$f ]] || die "no $f in $bundle: make the CPU references with tools/gpu_bundle.sh"
done

versions() { "$py" - <<'PY'
import importlib.util as u, sys, torch, transformers, megatron.core as m
try:
    import triton; t = triton.__version__
except ImportError:
    t = "none"
cuda = torch.cuda.is_available()
nccl = ".".join(map(str, torch.cuda.nccl.version())) if cuda else "none (no CUDA)"
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "nccl", nccl,
      "triton", t, "transformers", transformers.__version__, "megatron-core", m.__version__)
from real_megatron.actor.model import fusions, use_transformer_engine
print("gpu_check: transformer_engine", "present" if u.find_spec("transformer_engine") else "absent",
      "apex", "present" if u.find_spec("apex") else "absent",
      "; layer spec: bf16", "transformer_engine" if use_transformer_engine(torch.bfloat16) else "local",
      "fp32 local; fusions:", " ".join(k for k, on in fusions(cuda).items() if on) or "none")
PY
}
if (( dry )); then
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1 REAL_MEGATRON_GPU_DRY_RUN=1
  log "gpu_check: CPU dry run (toy sizes, Triton interpreted); budget $budget s"
  bench=(--device cpu --tokens 256 --hidden 128 --vocab 8192) step=(--tiny) block=(--recompute-layers 1) resume_tol=0
  actor=(--device cpu --hidden 64 --layers 1 --groups 1 --group-size 2 --vocab 8192) offload=(--tiny)
else
  "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || die "no CUDA device (use --cpu-dry-run)"
  unset TRITON_INTERPRET
  name=$("$py" -c 'import torch; print(torch.cuda.get_device_name())')
  log "gpu_check: $name, $("$py" -c 'import torch; print(f"{torch.cuda.mem_get_info()[1] / 2**30:.1f} GiB")'), driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1); budget $budget s"
  # the card's peaks come from tools/bench_kernels.py's PEAKS table, by device name
  bench=(--device cuda --dtype bfloat16 --repeats 5) step=() block=(--recompute-layers 14) resume_tol=1e-6
  actor=(--device cuda --dtype bfloat16 --hidden 1536 --layers 4 --groups 8 --group-size 8 --max-tokens 16384) offload=()
fi
versions 2>&1 | tail -2 | sed 's/^python /gpu_check: python /' | tee -a "$logf"

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
  found=$(grep -E "$figures" "$itemlog" | tail -8 | tr -s ' ' | paste -sd ';' -)
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
rel = {k: float((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max().clamp_min(1e-30)) for k in a}
name = max(rel, key=rel.get)
worst = rel[name]
print(f"max relative difference over {len(a)} tensors: {worst:.3e} (tolerance {tol:g}), largest in {name}")
sys.exit(0 if worst <= tol else 1)
PY
}
parity() { "$py" "$root/tools/parity_step.py" "$@"; }
resume() {  # resume TOLERANCE: in each optimizer format `auto` picks for the 1.5B and 7B configs (once per format)
  local picks fmt
  picks=$("$py" - "$root"/configs/real_r1distill_qwen_{1p5b,7b}.yaml <<'PY'
import sys
from real_megatron.config import load_config
from real_megatron.memory import architecture_of, optimizer_format
for path in sys.argv[1:]:
    cfg = load_config(path)
    print(optimizer_format(cfg, architecture_of(cfg))[0], path)
PY
) || return 1
  echo "auto picks: $(echo "$picks" | sed 's|/.*/||' | paste -sd ';' -)"
  parity --steps 2 --out "$scratch/straight.safetensors" || return 1
  for fmt in $(echo "$picks" | cut -d' ' -f1 | sort -u); do
    parity --steps 1 --save "$scratch/ckpt_$fmt" --optimizer-format "$fmt" --out "$scratch/half.safetensors" | grep 'optimizer format' \
      && parity --steps 1 --load "$scratch/ckpt_$fmt" --out "$scratch/resumed.safetensors" \
      && compare "$scratch/resumed.safetensors" "$scratch/straight.safetensors" "$1" || return 1
  done
}
export -f compare parity resume; export py root scratch bundle

# the Triton kernel tests with the image's pytest plugins off (only pytest-timeout, from the bundle or the image)
item "(a) Triton kernels against the torch reference" 60 180 "passed|failed" \
  env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 "$py" -m pytest -p pytest_timeout -q -m gpu -p no:cacheprovider "$root/tests/gpu/test_gpu.py"
# against the bundle's reference (its megatron-core and Python) and this machine's CPU (this machine's
# megatron-core): a failure says whether the device or the version differs
item "(b) actor step against the CPU reference" 45 150 "max relative|differs" bash -c \
  "parity --steps 1 --out $scratch/parity_device.safetensors \
   && CUDA_VISIBLE_DEVICES= parity --steps 1 --out $scratch/parity_here_cpu.safetensors >/dev/null \
   && { echo -n 'vs this machine CPU: '; compare $scratch/parity_device.safetensors $scratch/parity_here_cpu.safetensors 1e-5; here=\$?; \
        echo -n 'vs the bundle (made elsewhere): '; compare $scratch/parity_device.safetensors $bundle/parity_cpu.safetensors 1e-5; there=\$?; \
        (( here )) && echo 'the DEVICE differs from the CPU on the same software'; \
        (( !here && there )) && echo 'the VERSION differs: this machine agrees with its own CPU, not with the bundle'; \
        exit \$((here | there)); }"
item "(c) bf16 step at DeepSeek-R1-Distill-Qwen-1.5B shape, 8k tokens" 100 220 \
  "^(tokens_per_s|mfu|peak_allocated_gib|peak_reserved_gib|memory_verdict|host_syncs_per_micro_batch|FAIL) " \
  "$py" "$root/tools/gpu_step.py" "${step[@]}" --count-syncs --json "$out/gpu_step.json"
item "(g) block recompute of half the layers: peak against the estimate" 70 180 "^(seq|peak_allocated_gib|estimate_gib|memory_verdict|FAIL) |--fit" \
  "$py" "$root/tools/gpu_step.py" "${step[@]}" "${block[@]}" --fit --json "$out/gpu_step_block.json"
item "(h) Qwen3-MoE step with routing replay against the CPU reference" 30 120 "max relative|first_update" bash -c \
  "parity --hf $bundle/moe_hf --routing-replay --require-zero-s --steps 1 --out $scratch/moe_device.safetensors \
   && compare $scratch/moe_device.safetensors $bundle/parity_cpu_moe.safetensors 1e-5"
item "(e) logits against transformers" 30 120 "max" \
  "$py" "$root/tools/check_parity.py" --hf "$bundle/tiny_hf" --tolerance 1e-4
item "(d) checkpoint resume in the optimizer format auto picks" 45 150 "max relative|optimizer format|auto picks" \
  bash -c "resume $resume_tol"
item "(i) colocated actor offload to host and back, 1.5B shape" 40 150 '"(held_gb|offload_state_s|offload_params_s|onload_s|freed_gb|bit_identical|ok)"' \
  "$py" "$root/tools/gpu_offload_check.py" "${offload[@]}" --json "$out/gpu_offload.json"
item "(a) kernel benchmark" 45 150 "^(naive|token|linear|lse|grad) " \
  "$py" "$root/tools/bench_kernels.py" "${bench[@]}" --json "$out/bench_kernels.json"
item "(f) actor data path benchmark" 60 180 "^\| (tokens/s|peak memory GB)" \
  "$py" "$root/tools/bench_actor.py" "${actor[@]}"
rm -rf "$scratch"
log "gpu_check: $([[ $failed == 0 ]] && echo 'all passed' || echo 'NOT ALL PASSED (see above)') in $SECONDS s; figures in $logf"
exit $failed
