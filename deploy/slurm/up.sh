#!/usr/bin/env bash
# A real single-node SLURM cluster on this host, for sweeps through submitit and for CI:
# installs slurm-wlm and munge when missing, writes a minimal slurm.conf (this host's cores
# and memory, proctrack/linuxproc, no cgroup requirement, no accounting daemon), starts
# munged, slurmctld and slurmd, and waits until `sinfo` shows the node idle. Safe to run
# again: a cluster already up is left as it is (FORGE_SLURM_RESTART=1 rewrites and restarts).
#
#   bash deploy/slurm/up.sh            # then: sinfo; forge-train -m ... hydra/launcher=forge_slurm
#   bash deploy/slurm/down.sh
#
# Settings (environment): FORGE_SLURM_CPUS (default: nproc), FORGE_SLURM_MEM_MB (default:
# total memory less 2 GiB), FORGE_SLURM_KILL_WAIT (SIGTERM -> SIGKILL on scancel, default 30 s).
#
# Once the node is up (fresh or found up), the task size that fits it is written to
# /etc/forge/slurm-task.yaml (FORGE_SLURM_TASK_FILE): one CPU a task and the node's memory
# shared by its CPUs, so that `hydra/launcher=forge_slurm` with nothing else set runs here.
# The launcher reads it where FORGE_SLURM_CPUS_PER_TASK / FORGE_SLURM_MEM_GB are unset; a
# cluster's own launcher file (conf/hydra/launcher/) decides on a real cluster.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

CONF=/etc/slurm/slurm.conf
LOGS=/var/log/slurm
NODE=$(hostname -s)
CPUS=${FORGE_SLURM_CPUS:-$(nproc)}
MEM_MB=${FORGE_SLURM_MEM_MB:-$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 2048 ))}
KILL_WAIT=${FORGE_SLURM_KILL_WAIT:-30}

say() { echo "slurm: $*" >&2; }

node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n1; }

# The task size that fits the node as slurmctld sees it (sinfo: CPUs, memory in MB).
write_task_file() {
  local file=${FORGE_SLURM_TASK_FILE:-/etc/forge/slurm-task.yaml} cpus mem_mb
  read -r cpus mem_mb < <(sinfo -h -N -n "$NODE" -o "%c %m" | head -n1)
  install -d -m 0755 "$(dirname "$file")"
  cat > "$file.tmp" <<TASK
# Written by deploy/slurm/up.sh for node $NODE ($cpus CPUs, $mem_mb MB): one task a CPU.
# forge_slurm's defaults where FORGE_SLURM_CPUS_PER_TASK / FORGE_SLURM_MEM_GB are unset.
cpus_per_task: 1
mem_gb: $(( mem_mb / cpus / 1024 > 0 ? mem_mb / cpus / 1024 : 1 ))
TASK
  mv "$file.tmp" "$file"
  say "task size for forge_slurm: 1 CPU, $(( mem_mb / cpus / 1024 > 0 ? mem_mb / cpus / 1024 : 1 )) GB ($file)"
}

if [[ -z "${FORGE_SLURM_RESTART:-}" ]] && command -v sinfo >/dev/null \
    && [[ "$(node_state)" =~ ^(idle|mixed|allocated)$ ]]; then
  say "already up: node $NODE $(node_state)"
  write_task_file
  exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  say "installing slurm-wlm and munge"
  apt-get install -y -qq slurm-wlm munge >/dev/null \
    || { apt-get update -qq && apt-get install -y -qq slurm-wlm munge >/dev/null; }
fi

# munge: the key the package made (or a new one), its daemon running as its own user.
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
[[ -s /etc/munge/munge.key ]] || { mungekey --create --keyfile=/etc/munge/munge.key;
                                   chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key; }
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  pkill -x munged 2>/dev/null || true
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 20); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
fi
munge -n </dev/null | unmunge >/dev/null || { say "munged is not answering"; exit 1; }

install -d -m 0755 /etc/slurm "$LOGS" /var/spool/slurmctld /var/spool/slurmd
cat > "$CONF" <<CONF
# Written by deploy/slurm/up.sh: one node, this host; no cgroups, no accounting daemon.
ClusterName=forge
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
# Each task is bound to the CPUs SLURM gave it, so a job (and its torch threads) sees its
# share: sched_getaffinity inside the sandbox.
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
# A cancelled job's processes get SIGTERM, then SIGKILL this many seconds later: the forge
# host settles the allocation (cancelled, refund) and marks its MLflow run KILLED meanwhile.
KillWait=$KILL_WAIT
# A job on a failed node is not requeued: the forge reaper settles its allocation.
JobRequeue=0
MinJobAge=300
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
rm -f /etc/slurm/cgroup.conf  # no cgroup plugin is configured or needed

pkill -x slurmd 2>/dev/null || true
pkill -x slurmctld 2>/dev/null || true
for _ in $(seq 20); do { pgrep -x slurmctld || pgrep -x slurmd; } >/dev/null || break; sleep 0.5; done
say "starting slurmctld and slurmd ($NODE: $CPUS CPUs, $MEM_MB MB)"
/usr/sbin/slurmctld -i || { tail -n 20 "$LOGS/slurmctld.log" >&2; exit 1; }  # -i: ignore state an earlier configuration saved
/usr/sbin/slurmd || { tail -n 20 "$LOGS/slurmd.log" >&2; exit 1; }

for _ in $(seq 60); do
  state=$(node_state || true)
  if [[ "$state" =~ ^(idle|mixed|allocated)$ ]]; then
    say "up: node $NODE $state"
    write_task_file
    exit 0
  fi
  if [[ "$state" =~ ^(down|drain|drained|unknown)\*?$ ]]; then
    scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
  fi
  sleep 1
done
say "node $NODE did not come up (state: ${state:-none}); logs:"
tail -n 20 "$LOGS/slurmctld.log" "$LOGS/slurmd.log" >&2 || true
exit 1
