# Shared by scripts/ and bench/: dependency install, build, and a local farm.
# Source it; it sets KILN_ROOT and KILN_BUILD.

set -euo pipefail
KILN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KILN_BUILD="${KILN_BUILD:-$KILN_ROOT/build}"

# Everything from Debian bookworm: toolchain, libraries, and the real peers
# the tests talk to (Nix, an OCI registry, skopeo, promtool, sshd).
KILN_PACKAGES=(
  g++ cmake ninja-build pkg-config git ca-certificates curl procps tar gzip zstd clang libclang-rt-14-dev
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev librocksdb-dev libssl-dev prometheus-cpp-dev libcivetweb-dev libzstd-dev
  libgtest-dev libgmock-dev libcurl4-openssl-dev libarchive-dev libdeflate-dev libisal-dev nlohmann-json3-dev libjemalloc-dev
  libcli11-dev
  nix-bin nix-setup-systemd docker-registry skopeo prometheus tmux jq systemd openssh-server openssh-client
)

log() { printf '\033[1m==>\033[0m %s %s\n' "$(date +%T)" "$*" >&2; }

# Installs only what is missing, so a second run does nothing.
ensure_deps() {
  local missing=()
  for p in "${KILN_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$p")
    fi
  done
  if ((${#missing[@]})); then
    log "installing ${#missing[@]} Debian package(s): ${missing[*]}"
    if [[ $(id -u) -ne 0 ]]; then
      echo "error: installing packages needs root (run as root, or install: ${missing[*]})" >&2
      exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  ensure_nix_config
  ensure_moto
}

# moto's standalone S3 server, the object-storage farm store's test peer
# (tests/support/local_s3.h). The machine image has it (pyenv's Python);
# else it comes from the Python registry.
ensure_moto() {
  if command -v moto_server >/dev/null || [[ -x /root/.pyenv/shims/moto_server ]]; then return 0; fi
  log "installing moto (an S3-compatible server for the tests) with pip"
  python3 -m pip install --quiet 'moto[server]' || {
    echo "error: the object-storage tests need moto_server: pip install 'moto[server]'" >&2
    exit 1
  }
}

# Debian's Nix runs builds without a sandbox (nix-setup-systemd sets it);
# make sure, and keep every command offline and flake-enabled.
ensure_nix_config() {
  if [[ -w /etc/nix/nix.conf || ! -e /etc/nix/nix.conf ]] && [[ $(id -u) -eq 0 ]]; then
    mkdir -p /etc/nix
    grep -q '^sandbox *= *false' /etc/nix/nix.conf 2>/dev/null || echo 'sandbox = false' >>/etc/nix/nix.conf
  fi
  export NIX_CONFIG=$'substituters =\nexperimental-features = nix-command flakes'
}

build_kiln() {
  log "building Kiln (CMake + Ninja, $KILN_BUILD)"
  # -g1: line tables and function names (profiles, backtraces) without
  # variables' debug info, which was a fifth of the compile time. A unity
  # build (8 sources per unit) takes a sixth to a third less again (5m15
  # against 6m15 for this tree on 2 cores). CI's three trees are all unity
  # builds; a missing include shows in a plain CMake build (the default).
  # KILN_UNIT_TESTS=OFF (scripts/test, when its sanitizer pass runs them):
  # the unit tests are not compiled here.
  cmake -S "$KILN_ROOT" -B "$KILN_BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O2 -g1 -DNDEBUG" -DKILN_UNIT_TESTS_IN_ALL="${KILN_UNIT_TESTS:-ON}" \
    -DCMAKE_UNITY_BUILD=ON -DCMAKE_UNITY_BUILD_BATCH_SIZE=8 >/dev/null
  ninja -C "$KILN_BUILD" -j "$(nproc)" | grep -v '^\[' || true
  [[ -x "$KILN_BUILD/bin/kiln" ]] || { echo "error: build failed" >&2; exit 1; }
}

# json_field FILE KEY: reads "KEY":"value" from a daemon's one-line ready file.
# For the benches: nanoseconds since the epoch, milliseconds since a now_ns
# value, and the median of the numbers on stdin (one per line).
now_ns() { date +%s%N; }
ms_since() { awk -v a="$1" -v b="$(now_ns)" 'BEGIN {printf "%.1f", (b - a) / 1e6}'; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

json_field() { sed -n "s/.*\"$2\":\"\([^\"]*\)\".*/\1/p" "$1"; }

# wait_ready FILE LOG: waits (at most 30 s) for a daemon's ready file.
wait_ready() {
  local i
  for ((i = 0; i < 300; i++)); do
    [[ -s "$1" ]] && return 0
    sleep 0.1
  done
  echo "error: daemon did not start; its log ($2):" >&2
  tail -20 "$2" >&2
  return 1
}

# start_registry DIR ADDR: Debian's docker-registry on ADDR (127.0.0.1:PORT:
# plain HTTP, no auth, storage under DIR/registry), pid added to DIR/pids.
start_registry() {
  local dir=$1 addr=$2 i
  mkdir -p "$dir/registry"
  cat >"$dir/registry.yml" <<YML
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $dir/registry
http:
  addr: $addr
YML
  docker-registry serve "$dir/registry.yml" >>"$dir/registry.log" 2>&1 &
  echo $! >>"$dir/pids"
  echo "$! docker-registry (log $dir/registry.log)" >>"$dir/names"
  for ((i = 0; i < 100; i++)); do
    curl -sf "http://$addr/v2/" >/dev/null && return 0
    sleep 0.1
  done
  echo "error: the registry did not start on $addr; its log ($dir/registry.log):" >&2
  tail -20 "$dir/registry.log" >&2
  return 1
}

# start_farm DIR COORD_LISTEN COORD_METRICS WORKERS WORKER_METRICS_BASE_PORT
# Starts a coordinator and WORKERS workers, state and logs under DIR, pids in
# DIR/pids. A base port of 0 gives every worker a free port. Extra flags:
# KILN_FARM_COORDINATOR_FLAGS and KILN_FARM_WORKER_FLAGS (words);
# KILN_FARM_MAX_JOBS: each worker's slots (default 2); KILN_FARM_PRIVATE_STORES
# non-empty: each worker on a Nix store of its own, DIR/worker-N-nix.
start_farm() {
  local dir=$1 listen=$2 metrics=$3 workers=$4 wport=$5
  mkdir -p "$dir"
  touch "$dir/pids"
  rm -f "$dir"/*.ready
  # shellcheck disable=SC2086 # Words on purpose.
  "$KILN_BUILD/bin/kiln-coordinator" --listen="$listen" --metrics-listen="$metrics" \
    --state-dir="$dir/coordinator" --ready-file="$dir/coordinator.ready" ${KILN_FARM_COORDINATOR_FLAGS:-} \
    >>"$dir/coordinator.log" 2>&1 &
  echo $! >>"$dir/pids"
  echo "$! kiln-coordinator (log $dir/coordinator.log)" >>"$dir/names"
  wait_ready "$dir/coordinator.ready" "$dir/coordinator.log"
  KILN_COORDINATOR=$(json_field "$dir/coordinator.ready" grpc)
  export KILN_COORDINATOR
  local i port wrap worker_nix_config
  for ((i = 1; i <= workers; i++)); do
    port=0
    ((wport == 0)) || port=$((wport + i - 1))
    wrap=()
    worker_nix_config=${NIX_CONFIG:-}
    if [[ -n ${KILN_FARM_PRIVATE_STORES:-} ]]; then
      # A store of its own, as on a machine of its own: a mount namespace
      # with DIR/worker-N-nix at /nix, initialised before the worker starts,
      # and no build users (separate stores would hand out the same ones).
      mkdir -p "$dir/worker-$i-nix"
      # shellcheck disable=SC2016 # Expanded by the inner shell.
      wrap=(/usr/bin/unshare --mount --propagation private /bin/sh -c
            'mount --bind "$0" /nix && nix-store --init && exec "$@"' "$dir/worker-$i-nix")
      worker_nix_config+=$'\nbuild-users-group ='
    fi
    # Its own cache directory too (what binary caches answered, by URL).
    XDG_CACHE_HOME="$dir/worker-$i-cache" NIX_CONFIG=$worker_nix_config "${wrap[@]}" \
      "$KILN_BUILD/bin/kiln-worker" --coordinator="$KILN_COORDINATOR" \
      --name="worker-$i" --work-dir="$dir/worker-$i" --max-jobs="${KILN_FARM_MAX_JOBS:-2}" \
      --metrics-listen="127.0.0.1:$port" \
      --nix-option=substituters= --ready-file="$dir/worker-$i.ready" ${KILN_FARM_WORKER_FLAGS:-} \
      >>"$dir/worker-$i.log" 2>&1 &
    echo $! >>"$dir/pids"
    echo "$! kiln-worker worker-$i (log $dir/worker-$i.log)" >>"$dir/names"
  done
  for ((i = 1; i <= workers; i++)); do wait_ready "$dir/worker-$i.ready" "$dir/worker-$i.log"; done
}

# stop_farm DIR: SIGTERM every daemon of the farm (workers first, so they do
# not reconnect to a stopping coordinator), wait for them to exit (30 s each,
# then SIGKILL). A daemon that had died before, exited other than 0, or had
# to be killed fails the stop: every log of DIR is copied to
# $KILN_KEPT_LOGS_DIR (default $TMPDIR/kiln-kept-logs, else /tmp/...)/NAME-TIME, which the
# error names, so a bench's clean-up cannot delete the evidence.
stop_farm() {
  local dir=$1 pid name i status failed=()
  [[ -f "$dir/pids" ]] || return 0
  declare -A alive=()
  for pid in $(tac "$dir/pids"); do
    if kill -TERM "$pid" 2>/dev/null; then alive[$pid]=1; fi
  done
  for pid in $(tac "$dir/pids"); do
    name=$(sed -n "s/^$pid //p" "$dir/names" 2>/dev/null)
    name=${name:-pid $pid}
    for ((i = 0; i < 300; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -KILL "$pid" 2>/dev/null; then
      failed+=("$name did not stop within 30 s of SIGTERM (killed)")
      continue
    fi
    # The daemons are this shell's children: wait reports how each ended
    # (127: another shell started it, so its status is not ours to know).
    # The registry is a peer, not Kiln: how it ends is its own affair.
    status=0
    wait "$pid" 2>/dev/null || status=$?
    if ((status == 127)) || [[ $name == docker-registry* ]]; then continue; fi
    if [[ -z ${alive[$pid]:-} ]]; then
      failed+=("$name had died before the stop (status $(describe_status "$status"))")
    elif ((status != 0)); then
      failed+=("$name exited with $(describe_status "$status") on SIGTERM")
    fi
  done
  rm -f "$dir/pids" "$dir/names"
  if ((${#failed[@]})); then
    for i in "${failed[@]}"; do echo "error: $i" >&2; done
    keep_logs "$(basename "$dir")" "$dir"/*.log
    return 1
  fi
}

# keep_logs LABEL FILE...: copies the logs of daemons that ended badly to a
# new directory under $KILN_KEPT_LOGS_DIR (default $TMPDIR/kiln-kept-logs, else /tmp/...), out
# of reach of a script's clean-up, and says where.
keep_logs() {
  local kept
  kept="${KILN_KEPT_LOGS_DIR:-${TMPDIR:-/tmp}/kiln-kept-logs}/$1-$(date +%Y%m%dT%H%M%S)-$$"
  shift
  mkdir -p "$kept"
  cp "$@" "$kept/" 2>/dev/null || true
  echo "error: the logs are kept in $kept" >&2
}

# stop_daemon PID NAME LOG: one daemon started by this shell: SIGTERM, wait
# (30 s, then SIGKILL). Fails, keeping LOG (see keep_logs), unless it exited 0.
stop_daemon() {
  local pid=$1 name=$2 log=$3 i status=0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 300; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || status=$?
  ((status != 0)) || return 0
  echo "error: $name ended with $(describe_status "$status") on SIGTERM" >&2
  keep_logs "$name" "$log"
  return 1
}

# describe_status N: a shell exit status in words (128+N: signal N).
describe_status() {
  if (($1 > 128)); then
    echo "signal $(($1 - 128)) (SIG$(kill -l "$(($1 - 128))" 2>/dev/null || echo '?'))"
  else
    echo "exit code $1"
  fi
}

# stop_farm_at_exit FARM_DIR [PATH...]: the body of a script's EXIT trap:
# stops the farm, removes PATH..., and fails the script if the stop failed
# (the farm's logs are kept first; see stop_farm).
stop_farm_at_exit() {
  local status=$? dir=$1
  shift
  stop_farm "$dir" || { ((status != 0)) || status=1; }
  rm -rf "$@"
  exit "$status"
}

# farm_running DIR: true when every recorded daemon is alive.
farm_running() {
  local pid
  [[ -s "$1/pids" ]] || return 1
  for pid in $(cat "$1/pids"); do kill -0 "$pid" 2>/dev/null || return 1; done
}
