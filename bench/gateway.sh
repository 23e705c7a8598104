#!/usr/bin/env bash
# Nix's remote building, stock against Kiln, in the same run: a client on a
# Nix store of its own builds a graph of 40 derivations in 4 levels (each
# `sleep 1` with a small output; 16 leaves, 12, 8, 4, fan-in 2) with -j0,
#   (i)  against K stock remote builders: K "machines", each `nix-store
#        --serve --write` on a private store behind one loopback sshd (a key
#        per machine, its forced command entering that machine's store), one
#        slot each;
#   (ii) against `kiln serve-nix` behind the same sshd, in front of a farm of
#        K workers on private stores, one slot each;
# with K = BENCH_GATEWAY_MACHINES (4); the gateway advertised with 2K slots
# (the recommendation), and again with K. Also one trivial derivation's round
# trip (ii) vs (i). Each side builds fresh derivations (a nonce) into an
# empty client store. Headline: gateway_makespan_ratio_vs_nix_builders.
source "$(dirname "$0")/../scripts/lib.sh"
ensure_deps >&2
build_kiln >&2

machines=${BENCH_GATEWAY_MACHINES:-4}
work=$(mktemp -d)
trap 'kill "$(cat "$work/sshd.pid" 2>/dev/null)" 2>/dev/null; stop_farm_at_exit "$work/farm" "$work"' EXIT
KILN_FARM_MAX_JOBS=1 KILN_FARM_PRIVATE_STORES=1 start_farm "$work/farm" 127.0.0.1:0 127.0.0.1:0 "$machines" 0 >&2

# One sshd on 127.0.0.1, a key per machine; ssh aliases m1..mK (stock) and
# kiln (the gateway) name them for Nix.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
ssh-keygen -q -t ed25519 -N "" -f "$work/host"
: >"$work/authorized_keys"
: >"$work/ssh_config"
for ((m = 0; m <= machines; m++)); do
  ssh-keygen -q -t ed25519 -N "" -f "$work/key$m"
  if ((m == 0)); then
    alias=kiln
    command="$KILN_BUILD/bin/kiln serve-nix --coordinator=$KILN_COORDINATOR"
  else
    alias=m$m
    mkdir -p "$work/machine$m-nix"
    command="/usr/bin/unshare --mount --propagation private /bin/sh -c 'mount --bind $work/machine$m-nix /nix \
&& nix-store --init && exec nix-store --option build-users-group \"\" --serve --write'"
  fi
  echo "command=\"${command//\"/\\\"}\",restrict $(cat "$work/key$m.pub")" >>"$work/authorized_keys"
  printf 'Host %s\n  HostName 127.0.0.1\n  Port %s\n  User root\n  IdentityFile %s\n' "$alias" "$port" \
    "$work/key$m" >>"$work/ssh_config"
done
chmod 600 "$work/authorized_keys"
mkdir -p /run/sshd
cat >"$work/sshd_config" <<CONF
Port $port
ListenAddress 127.0.0.1
HostKey $work/host
AuthorizedKeysFile $work/authorized_keys
PermitRootLogin forced-commands-only
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
MaxStartups 100
PidFile $work/sshd.pid
CONF
/usr/sbin/sshd -f "$work/sshd_config" -E "$work/sshd.log"
export NIX_SSHOPTS="-F $work/ssh_config -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
for ((i = 0; i < 50; i++)); do ssh-keyscan -p "$port" 127.0.0.1 >/dev/null 2>&1 && break; sleep 0.1; done

cat >"$work/graph.nix" <<'NIX'
{ nonce }:
let
  node = name: deps: derivation {
    name = "gw-${name}-${nonce}"; system = "x86_64-linux"; builder = "/bin/sh";
    inherit deps;
    args = [ "-c" "/bin/sleep 1; echo ${name} $deps > $out" ];
  };
  range = n: builtins.genList (i: i) n;
  level = prefix: n: below: map (i: node "${prefix}${toString i}"
    [ (builtins.elemAt below (i * 2 - (i * 2 / builtins.length below) * builtins.length below))
      (builtins.elemAt below ((i * 2 + 1) - ((i * 2 + 1) / builtins.length below) * builtins.length below)) ]) (range n);
  l0 = map (i: node "leaf${toString i}" []) (range 16);
  l1 = level "a" 12 l0;
  l2 = level "b" 8 l1;
  l3 = level "c" 4 l2;
in l3
NIX
cat >"$work/trivial.nix" <<'NIX'
{ nonce }: derivation {
  name = "gw-trivial-${nonce}"; system = "x86_64-linux"; builder = "/bin/sh";
  args = [ "-c" "echo trivial > $out" ];
}
NIX

# client STORE_DIR BUILDERS FILE NONCE: nix-build -j0 in a fresh client
# store; prints the milliseconds it took.
client() {
  local store=$1 builders=$2 file=$3 nonce=$4 t0
  mkdir -p "$store"
  t0=$(now_ns)
  NIX_CONFIG=$'substituters =\nbuild-users-group =\nexperimental-features = nix-command' \
    /usr/bin/unshare --mount --propagation private /bin/sh -c \
    'mount --bind "$0" /nix && nix-store --init && exec "$@"' "$store" \
    nix-build --no-out-link -j0 --option builders "$builders" --option builders-use-substitutes false \
    "$file" --argstr nonce "$nonce" >"$store.out" 2>"$store.err" || { tail -20 "$store.err" >&2; exit 1; }
  ms_since "$t0"
}

stock=""
for ((m = 1; m <= machines; m++)); do stock+="ssh://m$m x86_64-linux - 1 1;"; done
# The gateway's maxJobs: the farm's slots and as many again, as
# docs/OPERATIONS.md recommends. A derivation handed over while every worker
# is busy waits in the coordinator's queue and starts the moment a slot
# frees; one the client holds back (all the machine's slots taken) is
# retried only after Nix's poll interval, 5 s. The same graph with maxJobs
# equal to the farm's slots is measured too.
gateway="ssh://kiln x86_64-linux - $((machines * 2)) 1"
gateway_equal="ssh://kiln x86_64-linux - $machines 1"

count=$(nix-instantiate "$work/graph.nix" --argstr nonce count-$$ 2>/dev/null | wc -l)
log "graph: $count top-level outputs, 40 derivations; $machines machines" >&2
nonce=$$-$(now_ns)
nix_ms=$(client "$work/c-nix" "$stock" "$work/graph.nix" "nix-$nonce")
kiln_ms=$(client "$work/c-kiln" "$gateway" "$work/graph.nix" "kiln-$nonce")
# Where Kiln's time went, from the coordinator's histograms (sums over
# every label set): per job, the wait for a worker and the time on it
# (inputs realised, built, outputs uploaded).
metrics=$(curl -fsS "http://$(json_field "$work/farm/coordinator.ready" metrics)/metrics")
mean_ms() {
  awk -v n="$1" '{split($1, a, "{")} a[1] == n "_sum" {s += $2} a[1] == n "_count" {c += $2}
    END {if (c > 0) printf "%.0f", s / c * 1000; else print 0}' <<<"$metrics"
}
kiln_queue_wait_ms=$(mean_ms kiln_job_queue_wait_seconds)
kiln_job_ms=$(mean_ms kiln_build_duration_seconds)
kiln_equal_ms=$(client "$work/c-kiln-equal" "$gateway_equal" "$work/graph.nix" "kiln-equal-$nonce")
nix_trivial_ms=$(client "$work/t-nix" "ssh://m1 x86_64-linux - 1 1" "$work/trivial.nix" "nix-$nonce")
kiln_trivial_ms=$(client "$work/t-kiln" "$gateway" "$work/trivial.nix" "kiln-$nonce")
# Both sides built the whole graph (with -j0, nothing was built locally).
for side in nix kiln kiln-equal; do
  n=$(wc -l <"$work/c-$side.out")
  ((n == 4)) || { echo "error: the $side side built $n top-level outputs, not 4" >&2; exit 1; }
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", a / b}'; }
echo "gateway_machines=$machines"
echo "gateway_derivations=40"
echo "gateway_nix_builders_makespan_ms=$nix_ms"
echo "gateway_kiln_makespan_ms=$kiln_ms"
echo "gateway_kiln_max_jobs_equal_to_slots_makespan_ms=$kiln_equal_ms"
echo "gateway_makespan_ratio_max_jobs_equal_to_slots=$(ratio "$kiln_equal_ms" "$nix_ms")"
echo "gateway_kiln_mean_queue_wait_ms=$kiln_queue_wait_ms"
echo "gateway_kiln_mean_job_on_worker_ms=$kiln_job_ms"
echo "gateway_nix_builders_trivial_ms=$nix_trivial_ms"
echo "gateway_kiln_trivial_ms=$kiln_trivial_ms"
echo "gateway_trivial_ratio_vs_nix_builders=$(ratio "$kiln_trivial_ms" "$nix_trivial_ms")"
echo "gateway_makespan_ratio_vs_nix_builders=$(ratio "$kiln_ms" "$nix_ms")"
