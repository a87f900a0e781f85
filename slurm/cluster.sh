#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, from the OS packages (Debian/Ubuntu, run as root).
#
#   bash slurm/cluster.sh install   apt-get the daemons and clients (munge, slurmctld, slurmd); no-op when present
#   bash slurm/cluster.sh start     write munge key + slurm.conf + gres.conf, start munged, slurmctld and slurmd,
#                                   wait until `sinfo` shows the node idle (idempotent: a running cluster whose
#                                   configuration is unchanged is kept; a changed one is restarted on the new one)
#   bash slurm/cluster.sh stop      stop the three daemons this script started (by their pid files)
#   bash slurm/cluster.sh status    daemons, `sinfo`; exit 0 when the node takes jobs, 1 otherwise
#
# The node is this host with its detected CPUs and memory and one *generic* GPU (a gres without a
# device file), so `--gpus-per-node=1` requests schedule even on a CPU-only machine; what runs there
# still sees no CUDA device. No accounting storage: `sacct` is absent (submitit warns and copes;
# trickbench reads the queue with `squeue`). See slurm/README.md for pointing a grid at a real cluster.
#
# The defaults are the strict settings a real cluster may have, so the tests run under them: `JobRequeue=0`
# (a batch job is requeueable only when it asks with --requeue) and `MaxArraySize=1001` (SLURM's default; a
# larger grid needs several arrays). A second partition holds only a GPU-less placeholder node that never
# comes up (it is never scheduled on), so the GPU-less-partition preflight has something real to refuse.
#
# Environment knobs (all optional):
#   TRICKBENCH_SLURM_PARTITION   default partition name (default: debug)
#   TRICKBENCH_SLURM_MAX_TIME    MaxTime of that partition (default: 1-00:00:00, one day)
#   TRICKBENCH_SLURM_OVERSUBSCRIBE  jobs that may share one core (default: 4, so many tiny array tasks run at once)
#   TRICKBENCH_SLURM_JOB_REQUEUE    JobRequeue (default: 0; 1 makes batch jobs requeueable without --requeue)
#   TRICKBENCH_SLURM_MAX_ARRAY_SIZE MaxArraySize (default: 1001, SLURM's own default)
#   TRICKBENCH_SLURM_NOGPU_PARTITION name of the GPU-less placeholder partition (default: nogpu; empty: none)
#   TRICKBENCH_SLURM_START_TIMEOUT  seconds to wait for the node to become idle (default: 90)
set -euo pipefail

CONF_DIR=/etc/slurm
STATE_DIR=/var/spool/trickbench-slurm
LOG_DIR=/var/log/slurm
RUN_DIR=/run/trickbench-slurm
PARTITION=${TRICKBENCH_SLURM_PARTITION:-debug}
MAX_TIME=${TRICKBENCH_SLURM_MAX_TIME:-1-00:00:00}
OVERSUBSCRIBE=${TRICKBENCH_SLURM_OVERSUBSCRIBE:-4}
JOB_REQUEUE=${TRICKBENCH_SLURM_JOB_REQUEUE:-0}
MAX_ARRAY_SIZE=${TRICKBENCH_SLURM_MAX_ARRAY_SIZE:-1001}
NOGPU_PARTITION=${TRICKBENCH_SLURM_NOGPU_PARTITION-nogpu}
START_TIMEOUT=${TRICKBENCH_SLURM_START_TIMEOUT:-90}
MUNGE_PID=/run/munge/munged.pid
CTLD_PID=$RUN_DIR/slurmctld.pid
SLURMD_PID=$RUN_DIR/slurmd.pid

log() { echo "cluster.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() {
  [ "$(id -u)" -eq 0 ] || die "run as root (it installs packages, writes /etc/slurm and starts daemons)"
}

alive() {  # alive PIDFILE: the process named in PIDFILE exists
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

cmd_install() {
  need_root
  if command -v munged >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
     && command -v sinfo >/dev/null && command -v srun >/dev/null; then
    log "munge and slurm are installed (slurm $(dpkg-query -W -f '${Version}' slurmd 2>/dev/null || echo '?'))"
    return 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # no recommends: they pull the slurm plugin development headers and hdf5/ipmi/rocm libraries
  apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client
  log "installed slurm $(dpkg-query -W -f '${Version}' slurmd)"
}

node_line() {  # NodeName=... CPUs=... Sockets/Cores/Threads as detected by slurmd itself, memory with headroom
  local detected mem_mb
  detected=$(slurmd -C | head -n 1)
  mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)  # 10% headroom for the OS and daemons
  # keep slurmd's topology fields, replace the memory, add the generic GPU
  echo "$detected" | sed -E "s/RealMemory=[0-9]+/RealMemory=${mem_mb}/; s/^NodeName=[^ ]+/NodeName=$(hostname -s)/" \
    | sed -E "s/\$/ Gres=gpu:1 State=UNKNOWN/"
}

nogpu_lines() {  # a GPU-less node that never responds (no slurmd at its address) and a partition of it alone
  [ -n "$NOGPU_PARTITION" ] || return 0
  echo "NodeName=${NOGPU_PARTITION}-node NodeAddr=127.0.0.1 Port=7 CPUs=1 RealMemory=1000 State=DOWN"
  echo "PartitionName=${NOGPU_PARTITION} Nodes=${NOGPU_PARTITION}-node Default=NO MaxTime=60 State=UP"
}

write_config() {  # writes slurm.conf.new and gres.conf.new (start decides whether to use them)
  local host cpus mem_per_cpu
  host=$(hostname -s)
  cpus=$(nproc)
  # default memory of a job per CPU: enough for every oversubscribed job of a full node to fit
  mem_per_cpu=$(awk -v c="$cpus" -v o="$OVERSUBSCRIBE" \
    '/^MemTotal:/ {m = int($2 / 1024 * 0.9 / c / o); print (m > 256 ? m : 256)}' /proc/meminfo)
  mkdir -p "$CONF_DIR" "$STATE_DIR/ctld" "$STATE_DIR/d" "$LOG_DIR" "$RUN_DIR"
  cat > "$CONF_DIR/slurm.conf.new" <<EOF
# Written by slurm/cluster.sh (trickbench): a single-node test cluster. Edits are overwritten by \`start\`.
ClusterName=trickbench
SlurmctldHost=${host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
StateSaveLocation=${STATE_DIR}/ctld
SlurmdSpoolDir=${STATE_DIR}/d
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${SLURMD_PID}
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups in containers/sandboxes: track job processes through /proc, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# no slurmdbd: sacct is absent; jobs are followed with squeue
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# cores and memory are the consumable resources; jobs without --mem get DefMemPerCPU per CPU
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=${mem_per_cpu}
GresTypes=gpu
# JobRequeue=0: a batch job is requeueable (preemption, node failure, scontrol requeue) only when it asks
# with --requeue, as trickbench's always do (TRICKBENCH_SLURM_JOB_REQUEUE=1 for SLURM's own default)
JobRequeue=${JOB_REQUEUE}
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
ReturnToService=2
# a test cluster: schedule at once, forget finished jobs soon, give SIGTERM'd jobs 30 s to checkpoint
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,defer_batch=0
MinJobAge=60
KillWait=30
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=60
MaxArraySize=${MAX_ARRAY_SIZE}
$(node_line)
PartitionName=${PARTITION} Nodes=${host} Default=YES MaxTime=${MAX_TIME} State=UP OverSubscribe=FORCE:${OVERSUBSCRIBE}
$(nogpu_lines)
EOF
  # a generic GPU backed by /dev/null: `--gpus-per-node=1` schedules, nothing real is bound (Slurm 22.05 drops a
  # gpu line with Count= and no File=, then drains the node: "gres/gpu count reported lower than configured")
  echo "NodeName=${host} Name=gpu File=/dev/null" > "$CONF_DIR/gres.conf.new"
}

config_unchanged() {  # the freshly written .new files equal the configuration the daemons run on
  cmp -s "$CONF_DIR/slurm.conf.new" "$CONF_DIR/slurm.conf" && cmp -s "$CONF_DIR/gres.conf.new" "$CONF_DIR/gres.conf"
}

install_config() {
  mv "$CONF_DIR/slurm.conf.new" "$CONF_DIR/slurm.conf"
  mv "$CONF_DIR/gres.conf.new" "$CONF_DIR/gres.conf"
}

start_munge() {
  if alive "$MUNGE_PID" && munge -n | unmunge >/dev/null 2>&1; then
    return 0
  fi
  mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
  chmod 0700 /etc/munge
  chmod 0400 /etc/munge/munge.key
  chmod 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do
    munge -n | unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "munged did not start (see /var/log/munge/munged.log)"
}

node_state() {  # the state of this host's node (not the placeholder's)
  sinfo -h -N -n "$(hostname -s)" -o '%T' 2>/dev/null | head -n 1 || true
}

cluster_up() {
  alive "$CTLD_PID" && alive "$SLURMD_PID" && case "$(node_state)" in
    *'*') return 1 ;;  # a trailing '*': slurmd is not responding (yet)
    idle* | mixed* | allocated* | completing*) return 0 ;;
    *) return 1 ;;
  esac
}

cmd_start() {
  need_root
  command -v slurmctld >/dev/null || die "slurm is not installed; run: bash slurm/cluster.sh install"
  local t0=$SECONDS
  write_config
  if cluster_up && config_unchanged; then
    rm -f "$CONF_DIR/slurm.conf.new" "$CONF_DIR/gres.conf.new"
    log "already running: node $(hostname -s) is $(node_state)"
    return 0
  fi
  start_munge
  # daemons that run but do not take jobs (stale config, node drained) or run on another configuration
  # (changed knobs): restart them on the fresh one; queued jobs survive (StateSaveLocation)
  stop_pidfile slurmd "$SLURMD_PID"
  stop_pidfile slurmctld "$CTLD_PID"
  install_config
  slurmctld || die "slurmctld did not start (see $LOG_DIR/slurmctld.log)"
  slurmd || die "slurmd did not start (see $LOG_DIR/slurmd.log)"
  local state=""
  while [ $((SECONDS - t0)) -lt "$START_TIMEOUT" ]; do
    state=$(node_state)
    case "$state" in
      idle) log "up in $((SECONDS - t0)) s: node $(hostname -s) idle, partition ${PARTITION}"; return 0 ;;
      down* | drain* | fail* | inval*)  # e.g. left down by an earlier unclean stop
        scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  log "node state after ${START_TIMEOUT} s: '${state}'"
  tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
  die "the cluster did not become idle"
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE: SIGTERM, wait up to 10 s, then SIGKILL
  local name=$1 file=$2 pid
  alive "$file" || { rm -f "$file"; return 0; }
  pid=$(cat "$file")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || { log "stopped $name ($pid)"; rm -f "$file"; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  log "killed $name ($pid)"
  rm -f "$file"
}

cmd_stop() {
  need_root
  stop_pidfile slurmd "$SLURMD_PID"
  stop_pidfile slurmctld "$CTLD_PID"
  stop_pidfile munged "$MUNGE_PID"
}

cmd_status() {
  local name file
  for name in munged slurmctld slurmd; do
    case $name in
      munged) file=$MUNGE_PID ;; slurmctld) file=$CTLD_PID ;; slurmd) file=$SLURMD_PID ;;
    esac
    if alive "$file"; then echo "$name: running (pid $(cat "$file"))"; else echo "$name: not running"; fi
  done
  if cluster_up; then
    sinfo
    return 0
  fi
  echo "cluster: not taking jobs"
  return 1
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
