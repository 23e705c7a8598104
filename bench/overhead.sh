#!/usr/bin/env bash
# Overhead of building through Kiln: wall time of `kiln build` of a trivial
# flake through a warm local farm (coordinator + 1 worker on 127.0.0.1) vs
# `nix build` of the same flake locally, in the same run. Every iteration uses
# a fresh flake (a unique marker), so both really evaluate and build.
#   BENCH_ITERATIONS=N (default 30)
source "$(dirname "$0")/../scripts/lib.sh"
ensure_deps >&2
build_kiln >&2

iterations=${BENCH_ITERATIONS:-30}
work=$(mktemp -d)
trap 'stop_farm_at_exit "$work/farm" "$work"' EXIT
start_farm "$work/farm" 127.0.0.1:0 127.0.0.1:0 1 0 >&2

make_flake() { # make_flake DIR MARKER
  mkdir -p "$1"
  cat >"$1/flake.nix" <<NIX
{
  outputs = { self }: {
    packages.x86_64-linux.default = derivation {
      name = "bench-trivial"; system = "x86_64-linux"; builder = "/bin/sh";
      args = [ "-c" "echo $2 > \$out" ];
    };
  };
}
NIX
}
p90() { sort -n | awk '{a[NR]=$1} END {i=int(NR*0.9+0.999); if(i<1)i=1; print a[i]}'; }

# Warm both paths once (Nix's eval cache, the farm's connections).
make_flake "$work/warm-nix" warm-nix-$$
make_flake "$work/warm-kiln" warm-kiln-$$
nix build --no-link --json "path:$work/warm-nix#default" >/dev/null 2>&1
"$KILN_BUILD/bin/kiln" build --quiet "$work/warm-kiln" >/dev/null

: >"$work/nix.ms"
: >"$work/kiln.ms"
for ((i = 0; i < iterations; i++)); do
  make_flake "$work/n$i" "nix-$$-$i-$(now_ns)"
  make_flake "$work/k$i" "kiln-$$-$i-$(now_ns)"
  t0=$(now_ns)
  nix build --no-link --json "path:$work/n$i#default" >/dev/null 2>&1
  t1=$(now_ns)
  "$KILN_BUILD/bin/kiln" build --quiet "$work/k$i" >/dev/null
  t2=$(now_ns)
  echo $(((t1 - t0) / 1000000)) >>"$work/nix.ms"
  echo $(((t2 - t1) / 1000000)) >>"$work/kiln.ms"
done

nix_median=$(median <"$work/nix.ms")
kiln_median=$(median <"$work/kiln.ms")
echo "iterations=$iterations"
echo "nix_build_median_ms=$nix_median"
echo "nix_build_p90_ms=$(p90 <"$work/nix.ms")"
echo "kiln_build_median_ms=$kiln_median"
echo "kiln_build_p90_ms=$(p90 <"$work/kiln.ms")"
echo "kiln_added_median_ms=$(awk -v k="$kiln_median" -v n="$nix_median" 'BEGIN {print k - n}')"
echo "overhead_ratio=$(awk -v k="$kiln_median" -v n="$nix_median" 'BEGIN {printf "%.3f", k / n}')"
