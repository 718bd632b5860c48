#!/usr/bin/env bash
# A real Slurm cluster on localhost: Debian's munge, slurmctld and slurmd, two virtual nodes
# (n1, n2: heterogeneous jobs need two), for the tests and for trying slurm/*.sbatch without a
# cluster. Run as root; no systemd needed. Everything (config, key, state, logs, pid files) lives
# under $SLURM_LOCAL_DIR (default /tmp/slurm-local); nothing is written to /etc/slurm.
#
#   tools/slurm_local.sh up       # install packages if missing, start daemons, wait until idle;
#                                 # idempotent; last line of stdout: export SLURM_CONF=...
#   tools/slurm_local.sh status   # daemons and sinfo
#   tools/slurm_local.sh down     # cancel jobs, stop only the daemons this script started
#   tools/slurm_local.sh wait JOBID [TIMEOUT_S]   # poll until the job ends; exit code = the job's
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
CTLD_PORT=${SLURM_LOCAL_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_LOCAL_SLURMD_PORT:-6818}   # node i listens on SLURMD_PORT + i - 1
NNODES=${SLURM_LOCAL_NODES:-2}
HOST=$(hostname -s)
CONF=$DIR/etc/slurm.conf
MUNGE_SOCK=$DIR/munge/munge.socket
CALLER_SLURM_CONF=${SLURM_CONF:-}
export SLURM_CONF=$CONF
NODES=(); for ((i = 1; i <= NNODES; i++)); do NODES+=("n$i"); done

log() { echo "[slurm-local $(date +%T)] $*" >&2; }

# true if the pid in file $1 is alive and runs executable $2 (a stale pid file is not "running")
running() {
  local pid
  [[ -s $1 ]] || return 1
  pid=$(<"$1")
  [[ $pid =~ ^[0-9]+$ && -e /proc/$pid ]] || return 1
  [[ $(readlink -f "/proc/$pid/exe" 2>/dev/null) == "$(readlink -f "$2")" ]]
}

install_packages() {
  local missing=() p
  for p in munge slurmctld slurmd slurm-client; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

write_config() {
  mkdir -p "$DIR"/{etc,state/ctld,log,run,munge}
  chmod 0755 "$DIR"
  chown munge:munge "$DIR/munge"; chmod 0755 "$DIR/munge"  # munged refuses group/world-writable dirs
  [[ -s $DIR/munge/munge.key ]] || mungekey --create --keyfile="$DIR/munge/munge.key"
  chown munge:munge "$DIR/munge/munge.key"; chmod 0600 "$DIR/munge/munge.key"
  local mem cpus i
  mem=$(awk -v n="$NNODES" '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9 / n}' /proc/meminfo)
  # at least 2 CPUs per virtual node (declared, config_overrides: jobs may oversubscribe the real
  # cores), so jobs can ask for --cpus-per-task > 1 and tests can see what each step gets
  cpus=$(( $(nproc) / NNODES )); ((cpus >= 2)) || cpus=2
  cat >"$CONF.tmp" <<CONF
ClusterName=local
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/d-%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
JobRequeue=1
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
KillWait=10
SlurmdTimeout=300
InactiveLimit=0
CONF
  for ((i = 1; i <= NNODES; i++)); do
    echo "NodeName=n$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((SLURMD_PORT + i - 1)) CPUs=$cpus RealMemory=$mem State=UNKNOWN" >>"$CONF.tmp"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$CONF.tmp"
  mv "$CONF.tmp" "$CONF"
}

start_daemons() {
  if running "$DIR/munge/munged.pid" /usr/sbin/munged; then
    log "munged running"
  else
    rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
    runuser -u munge -- /usr/sbin/munged --socket="$MUNGE_SOCK" --key-file="$DIR/munge/munge.key" \
      --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
    munge -S "$MUNGE_SOCK" -n | unmunge -S "$MUNGE_SOCK" >/dev/null
    log "munged started"
  fi
  if running "$DIR/run/slurmctld.pid" /usr/sbin/slurmctld-wlm; then
    log "slurmctld running"
  else
    /usr/sbin/slurmctld -f "$CONF" -i  # -i: ignore stale state of an earlier cluster
    log "slurmctld started"
  fi
  local n
  for n in "${NODES[@]}"; do
    if running "$DIR/run/slurmd-$n.pid" /usr/sbin/slurmd-wlm; then
      log "slurmd $n running"
    else
      mkdir -p "$DIR/state/d-$n"
      /usr/sbin/slurmd -f "$CONF" -N "$n"
      log "slurmd $n started"
    fi
  done
}

wait_idle() {
  local t0=$SECONDS states
  while ((SECONDS - t0 < 60)); do
    states=$(sinfo -h -N -o '%N %T' 2>/dev/null || true)
    if [[ -n $states ]] && ! awk '$2 !~ /^(idle|mixed|allocated)$/ {bad = 1} END {exit !bad}' <<<"$states"; then
      log "nodes up: $(tr '\n' ' ' <<<"$states")"
      return 0
    fi
    sleep 0.5
  done
  log "nodes not idle after 60 s"; sinfo -N -l >&2 || true; tail -n 30 "$DIR"/log/*.log >&2 || true
  return 1
}

stop_pidfile() {  # pidfile executable name
  local pid i
  if ! running "$1" "$2"; then rm -f "$1"; log "$3 not running"; return 0; fi
  pid=$(<"$1")
  kill -TERM "$pid"
  for ((i = 0; i < 100; i++)); do [[ -e /proc/$pid ]] || break; sleep 0.1; done
  [[ -e /proc/$pid ]] && { log "$3 ignored SIGTERM: SIGKILL"; kill -KILL "$pid" || true; }
  rm -f "$1"
  log "$3 stopped"
}

up() {
  [[ $(id -u) == 0 ]] || { echo "tools/slurm_local.sh up must run as root" >&2; exit 1; }
  install_packages
  if running "$DIR/run/slurmctld.pid" /usr/sbin/slurmctld-wlm && [[ -s $CONF ]]; then
    log "cluster already configured in $DIR"  # idempotent: keep the running config and its jobs
  else
    write_config
  fi
  start_daemons
  wait_idle
  echo "export SLURM_CONF=$CONF"
}

down() {
  if running "$DIR/run/slurmctld.pid" /usr/sbin/slurmctld-wlm; then
    scancel --full --user="$(id -un)" 2>/dev/null || true  # slurmd cleans up the jobs' processes
    local i
    for ((i = 0; i < 100; i++)); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.2; done
  fi
  local f
  for f in "$DIR"/run/slurmd-*.pid; do [[ -e $f ]] && stop_pidfile "$f" /usr/sbin/slurmd-wlm "slurmd $(basename "$f" .pid)"; done
  stop_pidfile "$DIR/run/slurmctld.pid" /usr/sbin/slurmctld-wlm slurmctld
  stop_pidfile "$DIR/munge/munged.pid" /usr/sbin/munged munged
}

status() {
  running "$DIR/munge/munged.pid" /usr/sbin/munged && echo "munged: up" || echo "munged: down"
  running "$DIR/run/slurmctld.pid" /usr/sbin/slurmctld-wlm && echo "slurmctld: up" || echo "slurmctld: down"
  local n
  for n in "${NODES[@]}"; do
    running "$DIR/run/slurmd-$n.pid" /usr/sbin/slurmd-wlm && echo "slurmd $n: up" || echo "slurmd $n: down"
  done
  sinfo 2>&1 || true
}

# Poll scontrol every second until the job (every component of a hetjob) is final (sbatch --wait
# notices the end only 10-30 s late). Prints the state; returns the job's exit code.
wait_job() {
  local job=$1 timeout=${2:-900} t0=$SECONDS out states rc
  while :; do
    out=$(scontrol -o show job "$job" 2>/dev/null) || { echo "job $job unknown to slurmctld" >&2; return 2; }
    states=$(grep -oE 'JobState=[A-Z_]+' <<<"$out" | cut -d= -f2 | tr '\n' ' ')
    grep -qE 'PENDING|CONFIGURING|RUNNING|COMPLETING|SUSPENDED|REQUEUE|RESIZING|SIGNALING|STAGE_OUT' <<<"$states" || break
    ((SECONDS - t0 < timeout)) || { echo "job $job still $states after ${timeout}s" >&2; return 124; }
    sleep 1
  done
  echo "job $job: $states$(grep -oE ' ExitCode=[0-9:]+' <<<"$out" | tr '\n' ' ')" >&2
  rc=$(awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^ExitCode=/) { split(substr($i, 10), a, ":");
         r = (a[2] > 0) ? 128 + a[2] : a[1]; if (r != 0) { print r; exit } } }' <<<"$out")
  if [[ -z $rc ]]; then grep -qvE '^(COMPLETED ?)+$' <<<"$states" && rc=1 || rc=0; fi
  return "$rc"
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  wait) export SLURM_CONF=${CALLER_SLURM_CONF:-$CONF}; wait_job "${2:?usage: wait JOBID [TIMEOUT_S]}" "${3:-900}" ;;
  *) echo "usage: $0 up|down|status|env|wait JOBID [TIMEOUT_S]" >&2; exit 2 ;;
esac
