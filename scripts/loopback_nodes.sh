#!/usr/bin/env bash
# Two ssh "nodes" on this machine, 127.0.0.1 and 127.0.0.2, served by a private sshd on a spare port with
# throwaway keys (nothing of the system's ssh setup is read or changed). For trying multi-node launches, and
# started once per test session by tests/ (the `loopback_nodes` fixture).
#
#   bash scripts/loopback_nodes.sh start DIR     # prints DIR/ssh_config; then:
#   launcher run recipes/lora_cls.py --hostfile hostfiles/loopback-two-nodes.txt --ssh-config DIR/ssh_config
#   bash scripts/loopback_nodes.sh stop DIR
set -euo pipefail
action=${1:-} dir=${2:-}
if [ -z "$action" ] || [ -z "$dir" ]; then
  echo "usage: $0 start|stop DIR" >&2
  exit 2
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
case "$action" in
stop)
  if [ -f "$dir/sshd.pid" ]; then kill "$(cat "$dir/sshd.pid")" 2>/dev/null || true; rm -f "$dir/sshd.pid"; fi
  exit 0
  ;;
start) ;;
*)
  echo "$0: unknown action $action (start or stop)" >&2
  exit 2
  ;;
esac
bash "$(dirname "$0")/system_packages.sh" >&2
sshd=$(command -v sshd || echo /usr/sbin/sshd)
if [ ! -x "$sshd" ]; then
  echo "$0: no sshd (install openssh-server: bash scripts/system_packages.sh as root)" >&2
  exit 1
fi
if [ -f "$dir/sshd.pid" ] && kill -0 "$(cat "$dir/sshd.pid")" 2>/dev/null; then
  echo "$dir/ssh_config"  # already serving
  exit 0
fi
port=${LOOPBACK_SSH_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
[ -f "$dir/host_key" ] || ssh-keygen -q -t ed25519 -N "" -f "$dir/host_key"
[ -f "$dir/id_ed25519" ] || ssh-keygen -q -t ed25519 -N "" -f "$dir/id_ed25519"
cp "$dir/id_ed25519.pub" "$dir/authorized_keys"
chmod 600 "$dir/authorized_keys"
mkdir -p /run/sshd  # sshd's privilege-separation directory
cat >"$dir/sshd_config" <<CONF
ListenAddress 127.0.0.1:$port
ListenAddress 127.0.0.2:$port
HostKey $dir/host_key
PidFile $dir/sshd.pid
AuthorizedKeysFile $dir/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
PrintMotd no
MaxStartups 200
MaxSessions 200
LogLevel ERROR
CONF
cat >"$dir/ssh_config" <<CONF
Host 127.0.0.1 127.0.0.2
  Port $port
  User $(id -un)
  IdentityFile $dir/id_ed25519
  IdentitiesOnly yes
  BatchMode yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
CONF
"$sshd" -f "$dir/sshd_config" -E "$dir/sshd.log"
for _ in $(seq 50); do
  if ssh -F "$dir/ssh_config" 127.0.0.2 true 2>/dev/null; then
    echo "$dir/ssh_config"
    exit 0
  fi
  sleep 0.1
done
echo "$0: sshd did not answer on 127.0.0.2:$port (see $dir/sshd.log)" >&2
exit 1
