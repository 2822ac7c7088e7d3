#!/usr/bin/env bash
# Start an sshd, as the container's own unprivileged user, for DeepSpeed's hostfile
# launcher: the head node's runner uses pdsh over ssh to start one launcher per node.
# An unprivileged sshd can only log in the user running it, which is all pdsh needs
# (the same user in the same image on every node), and it needs no root in the image.
#
# Keys: mount ONE key pair, the same on every node, at ~/.ssh/id_ed25519{,.pub}
# (e.g. a Kubernetes secret); its public half is authorized here. Or mount an
# authorized_keys file and point SSH_AUTHORIZED_KEYS at it.
#   SSH_PORT  port to listen on and to connect to (default 2222; needs host networking
#             or a published port on every node)
set -euo pipefail

port="${SSH_PORT:-2222}"
state="${SSHD_DIR:-${HOME}/.sshd}"
mkdir -p "${state}" "${HOME}/.ssh"
chmod 700 "${HOME}/.ssh" "${state}"

# A host key per container start; clients below don't pin host keys (see config).
if [[ ! -f "${state}/ssh_host_ed25519_key" ]]; then
  ssh-keygen -q -t ed25519 -N "" -f "${state}/ssh_host_ed25519_key"
fi

authorized="${HOME}/.ssh/authorized_keys"
if [[ -n "${SSH_AUTHORIZED_KEYS:-}" ]]; then
  cp "${SSH_AUTHORIZED_KEYS}" "${authorized}"
elif [[ -f "${HOME}/.ssh/id_ed25519.pub" ]]; then
  cp "${HOME}/.ssh/id_ed25519.pub" "${authorized}"
else
  echo "start_sshd: no key: mount ~/.ssh/id_ed25519{,.pub} or set SSH_AUTHORIZED_KEYS" >&2
  exit 1
fi
chmod 600 "${authorized}"

# pdsh's remote shell is non-interactive and does not see the image's ENV (PATH with
# the virtualenv, CUDA paths); sshd hands these to every session instead.
env | grep -E '^(PATH|LD_LIBRARY_PATH|CUDA_HOME|VIRTUAL_ENV|NVIDIA_[A-Z_]+|HF_HOME|DS_ACCELERATOR|PYTHONUNBUFFERED|SSL_CERT_FILE|REQUESTS_CA_BUNDLE|PIP_CERT)=' \
  > "${HOME}/.ssh/environment" || true

cat > "${state}/sshd_config" <<CONFIG
Port ${port}
HostKey ${state}/ssh_host_ed25519_key
PidFile ${state}/sshd.pid
AuthorizedKeysFile ${authorized}
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
UsePAM no
PermitUserEnvironment yes
CONFIG

# Client side, for the runner on the head node: containers get fresh host keys on
# every start, so pinning them would only break relaunches inside a private network.
# Per-host settings (another port, an address for a hostfile name) go in
# ~/.ssh/config.d/*.conf, mounted or written before this runs; ssh takes the first value
# it reads for each option, so they come before the defaults.
cat > "${HOME}/.ssh/config" <<CONFIG
Include config.d/*.conf
Host *
  Port ${port}
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
CONFIG
chmod 600 "${HOME}/.ssh/config"

/usr/sbin/sshd -f "${state}/sshd_config" -E "${state}/sshd.log"
echo "start_sshd: listening on port ${port} (log: ${state}/sshd.log)"
