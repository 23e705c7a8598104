# Shared by scripts/ and bench/: dependency install, build, and a local farm.
# Source it; it sets KILN_ROOT and KILN_BUILD.

set -euo pipefail
KILN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KILN_BUILD="${KILN_BUILD:-$KILN_ROOT/build}"

# Everything from Debian bookworm: toolchain, libraries, and the real peers
# the tests talk to (Nix, an OCI registry, skopeo, promtool).
KILN_PACKAGES=(
  g++ cmake ninja-build pkg-config git ca-certificates curl procps tar gzip clang libclang-rt-14-dev
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev librocksdb-dev libssl-dev prometheus-cpp-dev libcivetweb-dev
  libgtest-dev libgmock-dev libcurl4-openssl-dev libarchive-dev libdeflate-dev libisal-dev nlohmann-json3-dev libjemalloc-dev
  nix-bin nix-setup-systemd docker-registry skopeo prometheus tmux jq systemd
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
  # variables' debug info, which was a fifth of the compile time.
  cmake -S "$KILN_ROOT" -B "$KILN_BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O2 -g1 -DNDEBUG" >/dev/null
  ninja -C "$KILN_BUILD" -j "$(nproc)" | grep -v '^\[' || true
  [[ -x "$KILN_BUILD/bin/kiln" ]] || { echo "error: build failed" >&2; exit 1; }
}

# json_field FILE KEY: reads "KEY":"value" from a daemon's one-line ready file.
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
# KILN_FARM_COORDINATOR_FLAGS and KILN_FARM_WORKER_FLAGS (words).
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
  wait_ready "$dir/coordinator.ready" "$dir/coordinator.log"
  KILN_COORDINATOR=$(json_field "$dir/coordinator.ready" grpc)
  export KILN_COORDINATOR
  local i port
  for ((i = 1; i <= workers; i++)); do
    port=0
    ((wport == 0)) || port=$((wport + i - 1))
    "$KILN_BUILD/bin/kiln-worker" --coordinator="$KILN_COORDINATOR" --name="worker-$i" \
      --work-dir="$dir/worker-$i" --max-jobs=2 --metrics-listen="127.0.0.1:$port" \
      --nix-option=substituters= --ready-file="$dir/worker-$i.ready" ${KILN_FARM_WORKER_FLAGS:-} \
      >>"$dir/worker-$i.log" 2>&1 &
    echo $! >>"$dir/pids"
  done
  for ((i = 1; i <= workers; i++)); do wait_ready "$dir/worker-$i.ready" "$dir/worker-$i.log"; done
}

# stop_farm DIR: SIGTERM every daemon of the farm, wait for them to exit.
stop_farm() {
  local dir=$1 pid i
  [[ -f "$dir/pids" ]] || return 0
  # Workers first, so they do not reconnect to a stopping coordinator.
  for pid in $(tac "$dir/pids"); do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in $(cat "$dir/pids"); do
    for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  rm -f "$dir/pids"
}

# farm_running DIR: true when every recorded daemon is alive.
farm_running() {
  local pid
  [[ -s "$1/pids" ]] || return 1
  for pid in $(cat "$1/pids"); do kill -0 "$pid" 2>/dev/null || return 1; done
}
