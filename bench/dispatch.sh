#!/usr/bin/env bash
# Dispatch: a real kiln-coordinator (RocksDB, WAL on) over loopback gRPC,
# driven by kiln-dispatch-bench's simulated workers whose builds finish at
# once. Phases, each on a fresh coordinator unless said:
#   throughput  BENCH_WORKERS workers x 4 slots, BENCH_JOBS jobs submitted in
#               batches of 1,000: submitted -> assigned -> completed, every
#               state change stored. jobs/s, coordinator CPU per 1,000 jobs.
#   latency     the same farm, one job per request, sent on schedule (open
#               loop) at half the rate such requests sustain (measured
#               first): submit -> assignment latency percentiles.
#   memory      BENCH_QUEUED jobs queued with no worker: RSS per queued job.
#   recovery    that coordinator restarted on its state: seconds until it
#               serves again with every job loaded.
#   floor       the throughput load against kiln-dispatch-floor, a stand-in
#               that stores nothing and has no policy: the ceiling gRPC and
#               this protocol leave on this machine, with jobs packed into as
#               few messages as the slots allow and spread as locality does.
# The peer (a published gRPC Nix scheduler: ~130,000 assignments/s on 3
# cores, in memory only) cannot run here; its per-core figure is printed for
# the ratio. The coordinator is linked with jemalloc; the throughput phase
# also runs kiln-coordinator-glibc (same code, glibc malloc) for comparison.
source "$(dirname "$0")/../scripts/lib.sh"
ensure_deps >&2
build_kiln >&2
# The glibc-malloc coordinator is not in the default build.
ninja -C "$KILN_BUILD" kiln-coordinator-glibc 2>/dev/null | grep -v '^\[' >&2 || true

workers=${BENCH_WORKERS:-1000}
jobs=${BENCH_JOBS:-100000}
queued=${BENCH_QUEUED:-200000}
cores=$(nproc)
work=$(mktemp -d)
coordinator_pid=
floor_pid=
cleanup() {
  [[ -n $coordinator_pid ]] && kill "$coordinator_pid" 2>/dev/null && wait "$coordinator_pid" 2>/dev/null
  [[ -n $floor_pid ]] && kill "$floor_pid" 2>/dev/null && wait "$floor_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

# start_coordinator STATE_DIR [BINARY]: starts it, sets coordinator_pid and address.
start_coordinator() {
  rm -f "$work/ready"
  "$KILN_BUILD/bin/${2:-kiln-coordinator}" --listen=127.0.0.1:0 --metrics-listen=127.0.0.1:0 \
    --state-dir="$1" --ready-file="$work/ready" --log-level=warning >>"$work/coordinator.log" 2>&1 &
  coordinator_pid=$!
  wait_ready "$work/ready" "$work/coordinator.log"
  address=$(json_field "$work/ready" grpc)
}
# A coordinator that does not exit 0 on SIGTERM fails the bench, its log kept.
stop_coordinator() {
  local pid=$coordinator_pid
  coordinator_pid=
  stop_daemon "$pid" kiln-coordinator "$work/coordinator.log"
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$coordinator_pid/stat"; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$coordinator_pid/status"; }
field() { awk -F= -v k="$1" '$1 == k {print $2}' "$2"; }
load() { timeout 600 "$KILN_BUILD/bin/kiln-dispatch-bench" --coordinator="$address" --max_time=300s "$@"; }

# Throughput.
start_coordinator "$work/throughput"
c0=$(cpu_ticks)
load --mode=throughput --workers="$workers" --jobs="$jobs" >"$work/throughput.out"
c1=$(cpu_ticks)
stop_coordinator
rate=$(field jobs_per_s "$work/throughput.out")
ticks=$(getconf CLK_TCK)
glibc_rate=
if [[ -x $KILN_BUILD/bin/kiln-coordinator-glibc ]]; then
  start_coordinator "$work/throughput-glibc" kiln-coordinator-glibc
  g0=$(cpu_ticks)
  load --mode=throughput --workers="$workers" --jobs="$jobs" >"$work/throughput-glibc.out"
  g1=$(cpu_ticks)
  stop_coordinator
  glibc_rate=$(field jobs_per_s "$work/throughput-glibc.out")
fi

# The transport's ceiling: the same load against kiln-dispatch-floor, a
# stand-in coordinator that keeps nothing (no state store, no events, no
# policy) and hands queued jobs to free slots, either packed (as many per
# message as a worker's slots allow) or spread (scattered over the fleet,
# the message shape locality placement gives).
floor_rate() {
  local placement=$1
  rm -f "$work/floor.ready"
  "$KILN_BUILD/bin/kiln-dispatch-floor" --listen=127.0.0.1:0 --placement="$placement" \
    --ready_file="$work/floor.ready" >>"$work/floor.log" 2>&1 &
  floor_pid=$!
  wait_ready "$work/floor.ready" "$work/floor.log"
  timeout 600 "$KILN_BUILD/bin/kiln-dispatch-bench" --coordinator="$(json_field "$work/floor.ready" grpc)" \
    --max_time=300s --mode=throughput --workers="$workers" --jobs="$jobs" >"$work/floor-$placement.out"
  kill "$floor_pid"
  wait "$floor_pid" 2>/dev/null || true
  floor_pid=
}
floor_rate pack
floor_rate spread

# Latency at half load, one job per request (a developer's build; the case
# where waiting shows). Requests leave on schedule (open loop). One job per
# request costs the coordinator more than a job in a batch of 1,000, so
# "half load" is half of what such requests sustain: first offered at the
# batched rate (more than they sustain) for a few seconds, then at half of
# what was completed.
start_coordinator "$work/single"
single_jobs=$(awk -v r="$rate" 'BEGIN {n = r * 2; if (n > 20000) n = 20000; if (n < 1000) n = 1000; printf "%d", n}')
load --mode=latency --workers="$workers" --jobs="$single_jobs" --rate="$rate" >"$work/single.out"
stop_coordinator
single_rate=$(field jobs_per_s "$work/single.out")
start_coordinator "$work/latency"
half=$(awk -v r="$single_rate" 'BEGIN {printf "%d", r / 2}')
latency_jobs=$(awk -v r="$half" 'BEGIN {n = r * 5; if (n > 20000) n = 20000; if (n < 1000) n = 1000; printf "%d", n}')
load --mode=latency --workers="$workers" --jobs="$latency_jobs" --rate="$half" >"$work/latency.out"
stop_coordinator

# Memory per queued job, then recovery of that state.
start_coordinator "$work/queued"
sleep 0.5
rss0=$(rss_kib)
load --mode=fill --jobs="$queued" >"$work/fill.out"
rss1=$(rss_kib)
stop_coordinator
t0=$(date +%s%N)
start_coordinator "$work/queued"
t1=$(date +%s%N)
stop_coordinator

echo "malloc=$(ldd "$KILN_BUILD/bin/kiln-coordinator" | grep -q jemalloc && echo jemalloc || echo glibc)"
echo "cores=$cores"
echo "workers=$workers"
echo "jobs=$jobs"
echo "completed=$(field completed "$work/throughput.out")"
echo "throughput_seconds=$(field seconds "$work/throughput.out")"
echo "assignments_per_message=$(field assignments_per_message "$work/throughput.out")"
echo "coordinator_cpu_seconds_per_1000_jobs=$(awk -v d=$((c1 - c0)) -v t="$ticks" -v n="$jobs" 'BEGIN {printf "%.3f", d / t / n * 1000}')"
if [[ -n $glibc_rate ]]; then
  echo "glibc_malloc_jobs_per_s=$glibc_rate"
  echo "glibc_malloc_cpu_seconds_per_1000_jobs=$(awk -v d=$((g1 - g0)) -v t="$ticks" -v n="$jobs" 'BEGIN {printf "%.3f", d / t / n * 1000}')"
  echo "ratio_jemalloc_vs_glibc=$(awk -v a="$rate" -v b="$glibc_rate" 'BEGIN {printf "%.3f", a / b}')"
fi
echo "floor_pack_jobs_per_s=$(field jobs_per_s "$work/floor-pack.out")"
echo "floor_pack_assignments_per_message=$(field assignments_per_message "$work/floor-pack.out")"
echo "floor_spread_jobs_per_s=$(field jobs_per_s "$work/floor-spread.out")"
echo "floor_spread_assignments_per_message=$(field assignments_per_message "$work/floor-spread.out")"
echo "kiln_fraction_of_floor_spread=$(awk -v a="$rate" -v b="$(field jobs_per_s "$work/floor-spread.out")" 'BEGIN {printf "%.3f", a / b}')"
echo "single_job_requests_jobs_per_s=$single_rate"
echo "latency_rate_jobs_per_s=$half"
echo "latency_achieved_jobs_per_s=$(field jobs_per_s "$work/latency.out")"
echo "latency_jobs=$(field completed "$work/latency.out")"
echo "assign_latency_p50_us=$(field assign_latency_p50_us "$work/latency.out")"
echo "assign_latency_p99_us=$(field assign_latency_p99_us "$work/latency.out")"
echo "assign_latency_max_us=$(field assign_latency_max_us "$work/latency.out")"
echo "queued_jobs=$queued"
echo "queue_fill_jobs_per_s=$(awk -v n="$queued" -v s="$(field submit_seconds "$work/fill.out")" 'BEGIN {printf "%.0f", n / s}')"
echo "rss_bytes_per_queued_job=$(awk -v a="$rss0" -v b="$rss1" -v n="$queued" 'BEGIN {printf "%.0f", (b - a) * 1024 / n}')"
echo "recovery_seconds=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", (b - a) / 1e9}')"
echo "published_peer_jobs_per_s_per_core=43333"
echo "jobs_per_s_per_core=$(awk -v r="$rate" -v c="$cores" 'BEGIN {printf "%.0f", r / c}')"
echo "ratio_per_core_vs_published_peer=$(awk -v r="$rate" -v c="$cores" 'BEGIN {printf "%.3f", r / c / 43333}')"
echo "dispatch_jobs_per_s=$rate"
