#!/usr/bin/env bash
# Sources: sending a monorepo-sized tree to the coordinator's CAS.
# A generated tree of BENCH_FILES files (default 10,000) totalling
# BENCH_MB MiB (default 200) under a flake; a coordinator on 127.0.0.1 with
# no worker (`kiln build --detach` submits and returns). Phases:
#   first      a fresh CLI digest cache and an empty CAS: hash, upload,
#              submit. Compared with `sha256sum` over the same files in the
#              same run (page cache warm for both).
#   unchanged  the same tree again: wall time and what was sent.
#   one-file   one file changed: what was sent.
# Headline: sources_first_ratio_vs_sha256sum (throughput; ≥ 0.8 is the target).
source "$(dirname "$0")/../scripts/lib.sh"
ensure_deps >&2
build_kiln >&2

files=${BENCH_FILES:-10000}
mb=${BENCH_MB:-200}
work=$(mktemp -d)
trap 'stop_farm_at_exit "$work/farm" "$work"' EXIT
start_farm "$work/farm" 127.0.0.1:0 127.0.0.1:0 0 0 >&2
metrics=$(json_field "$work/farm/coordinator.ready" metrics)

# The tree: flake.nix plus data/DD/fNNN, 100 files per directory, random
# bytes (nothing compresses or deduplicates).
tree=$work/tree
mkdir -p "$tree/data"
cat >"$tree/flake.nix" <<'NIX'
{ outputs = { self }: { packages.x86_64-linux.default = derivation {
    name = "bench-sources"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo > $out" ]; }; }; }
NIX
dirs=$(((files + 99) / 100))
per_file=$((mb * 1048576 / files))
for ((d = 0; d < dirs; d++)); do
  n=$((files - d * 100 < 100 ? files - d * 100 : 100))
  mkdir -p "$tree/data/$d"
  head -c $((n * per_file)) /dev/urandom | split -b "$per_file" -d -a 3 - "$tree/data/$d/f"
done
# As in a checkout that is not seconds old: the CLI's digest cache does not
# remember files modified in the last two seconds (their mtime could still
# hide a change).
find "$tree" -type f -exec touch -d '1 hour ago' {} +
total_bytes=$(du -sb "$tree" | cut -f1)
file_count=$(find "$tree" -type f | wc -l)

metric() { curl -sf "http://$metrics/metrics" | awk -v m="$1" '$1 == m {printf "%d", $2}'; }
upload_field() { sed -n "s/.*\"$2\":\([0-9]*\).*/\1/p" "$1"; }
coordinator_pid=$(head -1 "$work/farm/pids")
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
kiln_submit() { # kiln_submit OUT: times one detached submission of the tree.
  local t0 c0
  t0=$(now_ns)
  c0=$(cpu_ticks "$coordinator_pid")
  KILN_CACHE_DIR=$work/cli-cache "$KILN_BUILD/bin/kiln" build --detach --json --quiet "$tree#default" >"$1"
  ms_since "$t0"
  echo "$(($(cpu_ticks "$coordinator_pid") - c0))" >"$1.coordinator_ticks"
}

# Warm the page cache for both contenders, then sha256sum.
find "$tree" -type f -print0 | xargs -0 cat >/dev/null
t0=$(now_ns)
find "$tree" -type f -print0 | xargs -0 sha256sum >/dev/null
sha_ms=$(ms_since "$t0")

up0=$(metric kiln_cas_uploaded_bytes_total)
first_ms=$(kiln_submit "$work/first.json")
up1=$(metric kiln_cas_uploaded_bytes_total)
again_ms=$(kiln_submit "$work/again.json")
up2=$(metric kiln_cas_uploaded_bytes_total)
# Change one file (same size, new bytes): a new mtime, so it is hashed again.
head -c "$per_file" /dev/urandom >"$tree/data/7/f042"
one_ms=$(kiln_submit "$work/one.json")

echo "files=$file_count"
echo "tree_bytes=$total_bytes"
echo "sha256sum_ms=$sha_ms"
echo "sha256sum_mib_per_s=$(awk -v b="$total_bytes" -v t="$sha_ms" 'BEGIN {printf "%.0f", b / 1048576 / (t / 1000)}')"
echo "first_submission_ms=$first_ms"
echo "first_submission_mib_per_s=$(awk -v b="$total_bytes" -v t="$first_ms" 'BEGIN {printf "%.0f", b / 1048576 / (t / 1000)}')"
echo "first_uploaded_bytes=$((up1 - up0))"
echo "first_coordinator_cpu_ms=$(($(cat "$work/first.json.coordinator_ticks") * 1000 / $(getconf CLK_TCK)))"
echo "first_blobs_sent=$(upload_field "$work/first.json" blobs)"
echo "unchanged_submission_ms=$again_ms"
echo "unchanged_uploaded_bytes=$((up2 - up1))"
echo "unchanged_blobs_sent=$(upload_field "$work/again.json" blobs)"
echo "unchanged_digests_asked=$(upload_field "$work/again.json" digestsAsked)"
echo "one_file_submission_ms=$one_ms"
echo "one_file_blobs_sent=$(upload_field "$work/one.json" blobs)"
echo "one_file_bytes_sent=$(upload_field "$work/one.json" bytes)"
echo "one_file_round_trips=$(upload_field "$work/one.json" roundTrips)"
echo "sources_first_ratio_vs_sha256sum=$(awk -v s="$sha_ms" -v k="$first_ms" 'BEGIN {printf "%.3f", s / k}')"
