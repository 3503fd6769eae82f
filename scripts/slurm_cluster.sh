#!/usr/bin/env bash
# A one-node Slurm cluster on this machine (munge, slurmctld, slurmd from the distribution's packages), for trying
# `launcher sbatch` and started once per test session by tests/ (the `slurm_cluster` fixture). Its configuration,
# state and logs live in DIR; commands reach it with SLURM_CONF=DIR/slurm.conf (printed by `start`).
#
#   export SLURM_CONF=$(bash scripts/slurm_cluster.sh start DIR)
#   launcher sbatch recipes/lora_cls.py --nodes 1 --gpus-per-node 2 --submit
#   bash scripts/slurm_cluster.sh stop DIR
#
# The whole machine is one node with all its cores (ProctrackType=proctrack/linuxproc and TaskPlugin=task/none:
# no cgroups, which containers rarely give); jobs run as the user who starts the cluster (root).
set -euo pipefail
action=${1:-} dir=${2:-}
if [ -z "$action" ] || [ -z "$dir" ]; then
  echo "usage: $0 start|stop DIR" >&2
  exit 2
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
stop() {
  for d in slurmctld slurmd munged; do
    if [ -f "$dir/$d.pid" ]; then kill "$(cat "$dir/$d.pid")" 2>/dev/null || true; fi
  done
  for _ in $(seq 50); do
    alive=0
    for d in slurmctld slurmd munged; do
      if [ -f "$dir/$d.pid" ] && kill -0 "$(cat "$dir/$d.pid")" 2>/dev/null; then alive=1; fi
    done
    [ $alive -eq 0 ] && break
    sleep 0.1
  done
  rm -f "$dir/slurmctld.pid" "$dir/slurmd.pid" "$dir/munged.pid"
}
case "$action" in
stop) stop; exit 0 ;;
start) ;;
*) echo "$0: unknown action $action (start or stop)" >&2; exit 2 ;;
esac
bash "$(dirname "$0")/system_packages.sh" >&2
for cmd in munged slurmctld slurmd sbatch scontrol; do
  if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
    echo "$0: no $cmd (install munge, slurmctld, slurmd, slurm-client: bash scripts/system_packages.sh as root)" >&2
    exit 1
  fi
done
export PATH="$PATH:/usr/sbin"
# munge authenticates Slurm's messages: one daemon for the machine, with the key the package made. One this script
# starts is stopped by `stop` (its pid in DIR); one that was running already is left alone.
if ! munge -n >/dev/null 2>&1; then
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  [ -f /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || create-munge-key -f; chown munge:munge /etc/munge/munge.key; }
  runuser -u munge -- munged
  for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
  [ ! -f /run/munge/munged.pid ] || cp /run/munge/munged.pid "$dir/munged.pid"
fi
if [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
  echo "$dir/slurm.conf"  # already running
  exit 0
fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
node=$(hostname -s)
mkdir -p "$dir/state" "$dir/spool"
cat >"$dir/slurm.conf" <<CONF
ClusterName=launcher
SlurmctldHost=$node(127.0.0.1)
SlurmUser=$(id -un)
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
InactiveLimit=0
KillWait=10
MinJobAge=300
SlurmdTimeout=300
Waittime=0
NodeName=$node NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF="$dir/slurm.conf"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 100); do
  if sinfo -h -o %T 2>/dev/null | grep -qE "^idle"; then
    echo "$SLURM_CONF"
    exit 0
  fi
  sleep 0.2
done
echo "$0: the node did not come up idle: $(sinfo -h 2>&1) (see $dir/slurmctld.log, $dir/slurmd.log)" >&2
exit 1
