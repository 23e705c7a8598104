#!/usr/bin/env bash
# One target whose graph has independent derivations, on one worker: `kiln
# build` through a local farm of one worker with 4 slots on a Nix store of its
# own, against a local `nix-build -j4` of the same graph, in the same run.
# The graph: 23 derivations in four levels, each `sleep 1` (12 leaves; 6 that
# take 2 leaves each; 4 that take 2 of those; 1 top taking the 4). Every
# iteration uses a fresh nonce, so both really build all 23.
#   BENCH_ITERATIONS=N (default 3)
source "$(dirname "$0")/../scripts/lib.sh"
ensure_deps >&2
build_kiln >&2

iterations=${BENCH_ITERATIONS:-3}
work=$(mktemp -d)
trap 'stop_farm_at_exit "$work/farm" "$work"' EXIT
KILN_FARM_MAX_JOBS=4 KILN_FARM_PRIVATE_STORES=1 start_farm "$work/farm" 127.0.0.1:0 127.0.0.1:0 1 0 >&2

cat >"$work/graph.nix" <<'NIX'
{ nonce }:
let
  node = name: deps: derivation {
    name = "graph-${name}-${nonce}"; system = "x86_64-linux"; builder = "/bin/sh";
    inherit deps;
    args = [ "-c" "/bin/sleep 1; echo ${name} $deps > $out" ];
  };
  range = n: builtins.genList (i: i) n;
  leaves = map (i: node "leaf${toString i}" []) (range 12);
  pairs = map (i: node "pair${toString i}" [ (builtins.elemAt leaves (2 * i)) (builtins.elemAt leaves (2 * i + 1)) ]) (range 6);
  quads = map (i: node "quad${toString i}" [ (builtins.elemAt pairs i) (builtins.elemAt pairs (i + 2)) ]) (range 4);
in node "top" quads
NIX
make_flake() { # make_flake DIR NONCE
  mkdir -p "$1"
  cp "$work/graph.nix" "$1/"
  cat >"$1/flake.nix" <<NIX
{
  outputs = { self }: {
    packages.x86_64-linux.default = import ./graph.nix { nonce = "$2"; };
  };
}
NIX
}

# The graph is what we think it is: 23 derivations to build.
count=$(nix-store -qR "$(nix-instantiate "$work/graph.nix" --argstr nonce count-$$ 2>/dev/null)" | grep -c '\.drv$')
if ((count != 23)); then
  echo "error: the graph has $count derivations, not 23" >&2
  exit 1
fi

: >"$work/nix.ms"
: >"$work/kiln.ms"
for ((i = 0; i < iterations; i++)); do
  make_flake "$work/k$i" "kiln-$$-$i-$(now_ns)"
  t0=$(now_ns)
  nix-build "$work/graph.nix" -j4 --no-out-link --argstr nonce "nix-$$-$i-$(now_ns)" >/dev/null 2>&1
  t1=$(now_ns)
  "$KILN_BUILD/bin/kiln" build --quiet "$work/k$i" >/dev/null
  t2=$(now_ns)
  echo $(((t1 - t0) / 1000000)) >>"$work/nix.ms"
  echo $(((t2 - t1) / 1000000)) >>"$work/kiln.ms"
done

nix_median=$(median <"$work/nix.ms")
kiln_median=$(median <"$work/kiln.ms")
echo "iterations=$iterations"
echo "derivations=$count"
echo "nix_build_j4_median_ms=$nix_median"
echo "kiln_build_4_slots_median_ms=$kiln_median"
echo "graph_ratio=$(awk -v k="$kiln_median" -v n="$nix_median" 'BEGIN {printf "%.3f", k / n}')"
