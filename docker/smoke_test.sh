#!/usr/bin/env bash
# End-to-end check of the CPU image and of the multi-node launch modes, on one machine.
# Needs root and Docker (starts a daemon with the vfs driver if none answers). Every
# container uses the host network, so all traffic stays on 127.0.0.1; nothing is pulled
# from a registry. Run from anywhere; rerunning is safe (what exists is reused, each
# check starts from an empty directory):
#
#   sudo docker/smoke_test.sh
#
# Steps: a local Debian base image (debootstrap + docker import) if missing; the CPU image
# built from it; then the checks, one line each, stopping at the first failure:
#   1 quickstart   scripts/quickstart.sh as the image's user, run dir on a mounted volume
#   2 tests        the fast test subset (-m "not slow") inside the container
#   3 nossh        two containers, one rank each, launch_nossh.sh ranks 0/1, ZeRO-2
#   4 hostfile     the same two containers, launch_hostfile.sh over pdsh/ssh
#   5 stop         `docker stop` of a 2-rank deepspeed job: the ranks checkpoint first
#
# Variables (all optional):
#   SMOKE_DIR     work directory (default /var/tmp/latent-pipeline-smoke); logs are there
#   IMAGE         image to build and check (default latent-pipeline:cpu)
#   BASE_IMAGE    base to build on (default latent-pipeline-base:bookworm, made if missing)
#   WHEELS_DIR    local wheel directory holding torch's CPU build, served to the build over
#                 http on 127.0.0.1 (default: pip's find-links, if it is a directory);
#                 unset and not configured: torch from PyTorch's CPU index
#   CA_CERTS      PEM file(s) to trust in the image (default the host's local CAs,
#                 /usr/local/share/ca-certificates/*.crt: a TLS-inspecting proxy's)
#   SHARED_DATA   the tests' shared data (default <repo>/../shared/data)
#   WHEELS_PORT   port of that http server (default 18080)
#   SSH_PORTS     the two sshd ports of check 4 (default "22222 22223")
#   MASTER_PORT   rendezvous port of checks 3 and 4 (default 29561)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${SMOKE_DIR:-/var/tmp/latent-pipeline-smoke}"
image="${IMAGE:-latent-pipeline:cpu}"
base="${BASE_IMAGE:-latent-pipeline-base:bookworm}"
shared="${SHARED_DATA:-${repo}/../shared/data}"
read -r ssh_port0 ssh_port1 <<< "${SSH_PORTS:-22222 22223}"
master_port="${MASTER_PORT:-29561}"
app_uid=1000 # the image's user (Dockerfile.cpu USER_UID)
# A rank whose peer died waits for torch's rendezvous timeout (30 min): fail sooner.
job_timeout=900
nodes=(lp-smoke-node0 lp-smoke-node1)
containers=(lp-smoke-stop "${nodes[@]}")
# A tiny preset for a few steps: the quickstart's shards, checkpoint at the end.
train_args=(--config tiny-liu data.path=runs/default/data train.max_steps=4 train.log_every=1
  train.eval_every=1000 train.checkpoint_every=0)

say() { printf 'smoke: %s\n' "$*"; }
die() {
  say "FAILED: $*"
  exit 1
}

# One check: its line, its time, its log; the first failure ends the run.
check() {
  local name="$1" started=${SECONDS}
  shift
  local log="${work}/logs/${name}.log"
  # In the background, not as an `if` condition: there bash would switch off `set -e`
  # inside the check, and a failed step would not fail it.
  "$@" > "${log}" 2>&1 &
  if wait $!; then
    say "${name}: ok ($((SECONDS - started)) s)"
  else
    say "${name}: FAILED after $((SECONDS - started)) s; last lines of ${log}:"
    tail -n 30 "${log}" | sed 's/^/    /'
    exit 1
  fi
}

remove_containers() {
  docker rm -f "${containers[@]}" > /dev/null 2>&1 || true
}

[[ "$(id -u)" == 0 ]] || die "needs root (to start dockerd, run debootstrap, chown the volumes)"
command -v docker > /dev/null || die "docker not found (apt-get install docker.io)"
mkdir -p "${work}/logs"

# --- the daemon -------------------------------------------------------------------------
if ! docker info > /dev/null 2>&1; then
  # vfs: works on any filesystem (no overlay support needed); no iptables and no bridge:
  # every container here uses the host network.
  say "starting dockerd (log: ${work}/dockerd.log)"
  nohup dockerd --storage-driver=vfs --iptables=false --bridge=none \
    > "${work}/dockerd.log" 2>&1 &
  for _ in $(seq 60); do
    docker info > /dev/null 2>&1 && break
    sleep 1
  done
  docker info > /dev/null 2>&1 || die "dockerd did not come up; see ${work}/dockerd.log"
fi
remove_containers
trap remove_containers EXIT

# --- the base image ---------------------------------------------------------------------
if ! docker image inspect "${base}" > /dev/null 2>&1; then
  command -v debootstrap > /dev/null || die "debootstrap not found (apt-get install debootstrap)"
  started=${SECONDS}
  rm -rf "${work}/rootfs"
  debootstrap --variant=minbase bookworm "${work}/rootfs" > "${work}/logs/base.log" 2>&1 ||
    die "debootstrap failed; see ${work}/logs/base.log"
  tar -C "${work}/rootfs" -c . | docker import - "${base}" >> "${work}/logs/base.log"
  rm -rf "${work}/rootfs"
  say "base image ${base}: made ($((SECONDS - started)) s)"
else
  say "base image ${base}: present"
fi

# --- the CPU image ----------------------------------------------------------------------
build_args=(--build-arg "BASE_IMAGE=${base}")
wheels="${WHEELS_DIR-$(pip config list 2> /dev/null | sed -n "s/^global\.find-links='\([^ ']*\).*/\1/p")}"
server_pid=""
if [[ -n "${wheels}" && -d "${wheels}" ]]; then
  # The build reaches the wheels the way it would reach a site's mirror: over http. An
  # empty TORCH_INDEX_URL makes torch come from the regular index plus these links,
  # where the local +cpu build outranks the registry's CUDA build of the same version.
  # A fixed port: build arguments are part of the layer cache key, so a new URL per run
  # would rebuild every layer.
  wheel_port="${WHEELS_PORT:-18080}"
  python3 -m http.server --bind 127.0.0.1 --directory "${wheels}" "${wheel_port}" \
    > "${work}/logs/wheels_http.log" 2>&1 &
  server_pid=$!
  sleep 1
  kill -0 "${server_pid}" 2> /dev/null ||
    die "cannot serve ${wheels} on 127.0.0.1:${wheel_port} (set WHEELS_PORT); see ${work}/logs/wheels_http.log"
  trap 'kill "${server_pid}" 2> /dev/null || true; remove_containers' EXIT
  build_args+=(--build-arg TORCH_INDEX_URL= --build-arg "PIP_FIND_LINKS=http://127.0.0.1:${wheel_port}/")
fi
if [[ -n "${CA_CERTS:-}" ]]; then
  read -ra ca_files <<< "${CA_CERTS}"
else
  shopt -s nullglob
  ca_files=(/usr/local/share/ca-certificates/*.crt)
  shopt -u nullglob
fi
if ((${#ca_files[@]})); then
  build_args+=(--build-arg "EXTRA_CA_CERTS=$(cat "${ca_files[@]}")")
fi
started=${SECONDS}
docker build --network host -f "${repo}/docker/Dockerfile.cpu" -t "${image}" "${build_args[@]}" \
  "${repo}" > "${work}/logs/build.log" 2>&1 ||
  die "image build failed; last lines of ${work}/logs/build.log:$(printf '\n')$(tail -n 30 "${work}/logs/build.log")"
say "image ${image}: built ($((SECONDS - started)) s; wheels: ${wheels:-PyTorch CPU index}, CA files: ${#ca_files[@]})"
if [[ -n "${server_pid}" ]]; then
  kill "${server_pid}" 2> /dev/null || true
fi

# A fresh volume for the checks, owned by the image's user (a bind mount keeps host owners).
runs="${work}/runs"
rm -rf "${runs}"
mkdir -p "${runs}"
chown "${app_uid}:${app_uid}" "${runs}"
test -d "${shared}" || die "the tests' shared data is not at ${shared} (set SHARED_DATA)"
# --shm-size: DeepSpeed's CPU shared-memory collectives and DataLoader workers live in
# /dev/shm, and Docker's 64 MB default fails the tests with "No space left on device".
on_host=(--network host --shm-size=2g -v "${runs}:/workspace/runs"
  -v "$(cd "${shared}" && pwd):/shared/data:ro" -e PIPELINE_SHARED_DATA=/shared/data)

# The two "nodes": containers that idle until the checks exec into them, as a cluster's
# job containers would. Both sshds trust one key pair (mounted, owned by the image's
# user); ~/.ssh/config.d names the two nodes and their ports, as DNS would on a cluster.
# The hostfile is not at DeepSpeed's default /job/hostfile: there, every plain `deepspeed`
# in these containers (the quickstart's too) would launch on both nodes.
# (Few containers: under the vfs driver each start copies the whole image.)
started=${SECONDS}
ssh_dir="${work}/ssh"
rm -rf "${ssh_dir}"
mkdir -p "${ssh_dir}/config.d"
ssh-keygen -q -t ed25519 -N "" -C lp-smoke -f "${ssh_dir}/id_ed25519"
printf 'Host node-0\n  HostName 127.0.0.1\n  Port %s\nHost node-1\n  HostName 127.0.0.1\n  Port %s\n' \
  "${ssh_port0}" "${ssh_port1}" > "${ssh_dir}/config.d/nodes.conf"
printf 'node-0 slots=1\nnode-1 slots=1\n' > "${ssh_dir}/hostfile"
chown -R "${app_uid}:${app_uid}" "${ssh_dir}"
chmod 600 "${ssh_dir}/id_ed25519"
ports=("${ssh_port0}" "${ssh_port1}")
for i in 0 1; do
  docker run -d --name "${nodes[i]}" "${on_host[@]}" -e START_SSHD=1 -e "SSH_PORT=${ports[i]}" \
    -v "${ssh_dir}/id_ed25519:/home/pipeline/.ssh/id_ed25519:ro" \
    -v "${ssh_dir}/id_ed25519.pub:/home/pipeline/.ssh/id_ed25519.pub:ro" \
    -v "${ssh_dir}/config.d:/home/pipeline/.ssh/config.d:ro" \
    -v "${ssh_dir}/hostfile:/home/pipeline/hostfile:ro" \
    "${image}" sleep infinity > /dev/null
done
say "containers ${nodes[*]}: started ($((SECONDS - started)) s)"
# Check 5's container, created (the slow part) while the other checks run: a 2-rank job
# that would train for a long time, started through the image's entrypoint (PID 1).
docker create --name lp-smoke-stop "${on_host[@]}" "${image}" \
  deepspeed --num_gpus 2 launchers/pretrain.py --ds_config ds_configs/zero2_cpu.json \
  "${train_args[@]}" train.max_steps=100000 train.output_dir=runs/smoke/stop \
  > "${work}/logs/stop.create.log" 2>&1 &
create_pid=$!

# --- 1: the quickstart ------------------------------------------------------------------
quickstart() {
  # The image's default command, as its user (exec runs as the image's USER).
  [[ "$(docker inspect -f '{{json .Config.Cmd}}' "${image}")" == '["bash","scripts/quickstart.sh"]' ]]
  docker exec "${nodes[0]}" bash scripts/quickstart.sh
  local out="${runs}/default/liu/export"
  grep -q "ppl of the k-th token after augmentation" "${work}/logs/quickstart.log"
  grep -qE '^\| 1 \| [0-9.]+ ' "${work}/logs/quickstart.log" # the table's k=1 row
  test -s "${out}/pipeline.json"
  find "${out}" -name '*.safetensors' | grep .
  # Written by the image's user, not root...
  [[ "$(stat -c %u "${out}/pipeline.json")" == "${app_uid}" ]]
  [[ "$(docker inspect -f '{{.Config.User}}' "${image}")" == pipeline ]]
  # ...and nowhere in the image's code or virtualenv (caches under /tmp and ~ are fine).
  echo "--- written outside the volumes:"
  docker diff "${nodes[0]}" | tee "${work}/logs/quickstart.diff"
  if grep -E '^[ACD] /(workspace|opt)(/|$)' "${work}/logs/quickstart.diff"; then
    echo "the quickstart wrote into the image's code or virtualenv (above)"
    return 1
  fi
}
check quickstart quickstart

# --- 2: the fast tests ------------------------------------------------------------------
tests() {
  docker exec "${nodes[0]}" python -m pytest -q -m "not slow" -p no:cacheprovider
}
check tests tests

# --- 3 and 4: the two containers, one rank each -------------------------------------------
# Rank 0 wrote the model states, each rank its ZeRO-2 optimizer partition, at the end.
checkpoint_written() {
  local dir="${runs}/smoke/$1/checkpoints/step4"
  ls -l "${dir}"
  test -s "${dir}/mp_rank_00_model_states.pt"
  test -s "${dir}/zero_pp_rank_0_mp_rank_00_optim_states.pt"
  test -s "${dir}/zero_pp_rank_1_mp_rank_00_optim_states.pt"
}

nossh() {
  local pids=() rank status=0
  for rank in 0 1; do
    timeout "${job_timeout}" docker exec "${nodes[rank]}" docker/launch_nossh.sh --num_nodes 2 --node_rank "${rank}" \
      --gpus_per_node 1 --master_addr 127.0.0.1 --master_port "${master_port}" \
      --ds_config ds_configs/zero2_cpu.json -- "${train_args[@]}" train.output_dir=runs/smoke/nossh \
      > "${work}/logs/nossh.rank${rank}.log" 2>&1 &
    pids+=($!)
  done
  for rank in 0 1; do
    wait "${pids[rank]}" || {
      echo "node ${rank} failed; see ${work}/logs/nossh.rank${rank}.log"
      status=1
    }
  done
  ((status == 0)) || return 1
  grep -h "dist_world_size=2" "${work}"/logs/nossh.rank*.log
  checkpoint_written nossh
}
check nossh nossh

hostfile() {
  # Checked the way the runner will: each node answers over ssh under its hostfile name.
  docker exec "${nodes[0]}" ssh node-0 hostname
  docker exec "${nodes[0]}" ssh node-1 hostname
  # SSH_PORT emptied: the ports differ per node and come from ~/.ssh/config.d instead.
  timeout "${job_timeout}" docker exec -e SSH_PORT= "${nodes[0]}" docker/launch_hostfile.sh \
    --hostfile /home/pipeline/hostfile --master_addr 127.0.0.1 \
    --master_port "${master_port}" --ds_config ds_configs/zero2_cpu.json \
    -- "${train_args[@]}" train.output_dir=runs/smoke/hostfile
  checkpoint_written hostfile
}
check hostfile hostfile
docker rm -f "${nodes[@]}" > /dev/null 2>&1 &

# --- 5: docker stop checkpoints -----------------------------------------------------------
stop() {
  docker start lp-smoke-stop
  local waited=0
  until docker logs lp-smoke-stop 2>&1 | grep -c "MLflow run" > /dev/null; do # training began
    ((waited++ < 180)) || return 1
    sleep 1
  done
  sleep 10 # past the tracker's start: the stop handler is installed right after it
  docker stop -t 120 lp-smoke-stop
  docker logs lp-smoke-stop 2>&1
  echo "exit code: $(docker inspect -f '{{.State.ExitCode}}' lp-smoke-stop)"
  docker logs lp-smoke-stop 2>&1 | grep -c "checkpointing at the end of this step"
  local step
  step="$(find "${runs}/smoke/stop/checkpoints" -name mp_rank_00_model_states.pt)"
  echo "stop checkpoint: ${step}"
  [[ -n "${step}" ]]
  test -s "$(dirname "${step}")/zero_pp_rank_1_mp_rank_00_optim_states.pt"
}
wait "${create_pid}" || die "could not create lp-smoke-stop; see ${work}/logs/stop.create.log"
check stop stop

say "all checks passed (${SECONDS} s in all; logs in ${work}/logs)"
