#!/usr/bin/env bash
# The system packages multi-node launches and their tests use: openssh (client and server: the ssh runner and the
# loopback "nodes" of tests/), pdsh (DeepSpeed's multi-node runner), and Slurm with munge (`launcher sbatch`, the
# one-node cluster of scripts/slurm_cluster.sh). Installed with apt-get where we are root and
# they are missing; elsewhere this says what is missing and changes nothing (those tests then skip, saying why).
# Safe to re-run: it only installs what is missing.
set -euo pipefail
want=(ssh:openssh-client sshd:openssh-server pdsh:pdsh munged:munge slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client)
missing=()
for pair in "${want[@]}"; do
  cmd=${pair%%:*} pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: not installing ${missing[*]} (needs root and apt-get); the multi-node tests will skip"
  exit 0
fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
