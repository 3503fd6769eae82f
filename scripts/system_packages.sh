#!/usr/bin/env bash
# The system packages only the long test tier (`make test-long`) uses, each for a reason:
#   openssh-client, openssh-server  the ssh runner and the loopback "nodes" (a private sshd on a spare port)
#   pdsh                            DeepSpeed's multi-node runner
#   munge, slurmctld, slurmd,       `launcher sbatch` and srun on a one-node Slurm cluster of the tests' own
#   slurm-client                    (scripts/slurm_cluster.sh)
#   chromium                        the headless check of `launcher report`'s page
# `make demo` and `make test` need none of them. Installed with apt-get only where we are root and they are missing,
# saying what and why first; no service is started or left enabled on this machine (the tests start their own
# daemons on spare ports and stop them). Elsewhere this says what is missing and changes nothing: those tests then
# skip, saying why. Quick when nothing is missing.
set -euo pipefail
want=(
  "ssh openssh-client the ssh runner"
  "sshd openssh-server the loopback nodes' private sshd"
  "pdsh pdsh DeepSpeed's multi-node runner"
  "munged munge Slurm's authentication"
  "slurmctld slurmctld the test cluster's controller"
  "slurmd slurmd the test cluster's node daemon"
  "sbatch slurm-client sbatch and srun"
  "chromium chromium the report page's headless check"
)
missing=() why=()
for entry in "${want[@]}"; do
  read -r cmd pkg reason <<<"$entry"
  if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
    missing+=("$pkg")
    why+=("  $pkg: $reason")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system packages: not installing ${missing[*]} (needs root and apt-get); the tests that use them will skip"
  exit 0
fi
echo "system packages: installing, for the long test tier only (no service is started or enabled):"
printf '%s\n' "${why[@]}"
# Debian's way to keep a package's install from starting its service: invoke-rc.d and deb-systemd-invoke ask
# policy-rc.d, and 101 means "not allowed". Ours only for this install, where the machine has none of its own.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  trap 'rm -f "$policy"' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null 2>&1 || true
for pkg in "${missing[@]}"; do  # one by one: a package the archive lacks (chromium somewhere) leaves the others
  apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null 2>&1 \
    || echo "system packages: apt-get could not install $pkg; the tests that use it will skip"
done
# Their postinst scripts enable their units for the next boot: undo that, for the units of what was just installed.
for pkg in "${missing[@]}"; do
  for unit in $(dpkg -L "$pkg" 2>/dev/null | grep -E '/systemd/system/[^/]+\.service$' || true); do
    deb-systemd-helper disable "$(basename "$unit")" >/dev/null 2>&1 || true
  done
done
