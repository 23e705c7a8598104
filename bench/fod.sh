#!/usr/bin/env bash
# FOD hash cache: how long it takes to be told a FOD's declared hash is wrong.
#   nix   `nix build` of a FOD with a wrong hash on a machine without its
#         output: Nix runs the FOD (here `sleep BENCH_FOD_SECONDS`, standing
#         in for `bun install`) and only then reports the mismatch.
#   kiln  `kiln build` of a FOD whose inputs the FOD cache has seen: the
#         worker fails it from the cache before anything runs (median of
#         BENCH_ITERATIONS, after one build that computed it).
# Then the cache is filled to BENCH_FOD_ENTRIES (default 1,000,000) entries
# and CheckFods latency is measured over gRPC on loopback (kiln-fod-bench).
# Headline: fod_stale_report_ratio_vs_nix (nix time / kiln time).
source "$(dirname "$0")/../scripts/lib.sh"
ensure_deps >&2
build_kiln >&2

seconds=${BENCH_FOD_SECONDS:-3}
iterations=${BENCH_ITERATIONS:-9}
entries=${BENCH_FOD_ENTRIES:-1000000}
work=$(mktemp -d)
trap 'stop_farm_at_exit "$work/farm" "$work"' EXIT
start_farm "$work/farm" 127.0.0.1:0 127.0.0.1:0 1 0 >&2
metrics=$(json_field "$work/farm/coordinator.ready" metrics)

make_flake() { # make_flake DIR NAME: a FOD declared with a stale hash (that of other content)
  mkdir -p "$1"
  cat >"$1/flake.nix" <<NIX
{
  outputs = { self }: {
    packages.x86_64-linux.default = derivation {
      name = "$2"; system = "x86_64-linux"; builder = "/bin/sh";
      args = [ "-c" "echo installing; /bin/sleep $seconds; echo $2 > \$out" ];
      outputHashMode = "flat"; outputHashAlgo = "sha256";
      outputHash = "sha256-sXeOrzphontbVa88nPidtueHhcDPGVz1PJZx2KiRP88=";
    };
  };
}
NIX
}

# Nix alone, on a store without the output (a fresh name each run).
make_flake "$work/nix" "bench-fod-nix-$$-$(now_ns)"
t0=$(now_ns)
if nix build --no-link "path:$work/nix" >"$work/nix.log" 2>&1; then
  echo "nix build of a wrong hash succeeded?" >&2
  exit 1
fi
nix_ms=$(ms_since "$t0")
grep -q "hash mismatch" "$work/nix.log" || { cat "$work/nix.log" >&2; exit 1; }

# Kiln: compute once, then time the reports.
make_flake "$work/kiln" "bench-fod-kiln-$$-$(now_ns)"
"$KILN_BUILD/bin/kiln" build --quiet "$work/kiln" >/dev/null 2>&1 && { echo "first kiln build succeeded?" >&2; exit 1; }
: >"$work/kiln.ms"
for ((i = 0; i < iterations; i++)); do
  t0=$(now_ns)
  "$KILN_BUILD/bin/kiln" build --json --quiet "$work/kiln" >"$work/kiln.json" 2>/dev/null && exit 1
  echo "$(ms_since "$t0")" >>"$work/kiln.ms"
  grep -q '"source":"cache"' "$work/kiln.json" || { cat "$work/kiln.json" >&2; exit 1; }
done
kiln_ms=$(median <"$work/kiln.ms")
avoided=$(curl -sf "http://$metrics/metrics" | awk '$1 == "kiln_fod_builds_avoided_total" {printf "%d", $2}')

"$KILN_BUILD/bin/kiln-fod-bench" --coordinator="$KILN_COORDINATOR" --entries="$entries" --lookups=20000 --batch=1
"$KILN_BUILD/bin/kiln-fod-bench" --coordinator="$KILN_COORDINATOR" --entries=0 --lookups=5000 --batch=50 |
  sed -n 's/^fod_lookup_\(p50_us\|p99_us\)=/fod_lookup_batch50_\1=/p'
echo "fod_seconds=$seconds"
echo "nix_discovers_ms=$nix_ms"
echo "kiln_reports_median_ms=$kiln_ms"
echo "fod_builds_avoided=$avoided"
echo "fod_stale_report_ratio_vs_nix=$(awk -v a="$nix_ms" -v b="$kiln_ms" 'BEGIN {printf "%.1f", a / b}')"
