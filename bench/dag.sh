#!/usr/bin/env bash
# bench/run dag: derivation-level scheduling (issue 26).
#   (a) The step graph alone (coordinator/step_graph.h) driving simulated
#       workers (kiln-dag-bench): random graphs of 10,000 and 100,000 steps
#       with heavy-tailed durations on 16 and 256 slots, and the balanced
#       cases (critical path close to work / slots) again with a duration
#       model that knows nothing (every step the default: the critical path
#       counts steps). Makespan over max(critical path, work / slots), and
#       the graph's decisions per second.
#   (b) Real workers (~60 sleep derivations on 4 workers, against stock Nix
#       builders) and the headline dag_makespan_over_lower_bound come with
#       the coordinator's use of the graph; not measured yet.
source "$(dirname "$0")/../scripts/lib.sh"
ensure_deps >&2
build_kiln >&2

bench="$KILN_BUILD/bin/kiln-dag-bench"
worst=0
slowest=""
for steps in 10000 100000; do
  for slots in 16 256; do
    out=$("$bench" --steps="$steps" --slots="$slots")
    echo "$out"
    ratio=$(sed -n 's/.*_makespan_over_lower_bound=//p' <<<"$out")
    rate=$(sed -n 's/.*_decisions_per_second=//p' <<<"$out")
    worst=$(awk -v a="$worst" -v b="$ratio" 'BEGIN {print (b > a ? b : a)}')
    if [[ -z $slowest ]] || ((rate < slowest)); then slowest=$rate; fi
  done
done
for steps in 10000 100000; do
  "$bench" --steps="$steps" --slots=16 --history=false --prefix=dag_sim_no_history | grep over_lower_bound
done
echo "dag_sim_min_decisions_per_second=$slowest"
echo "dag_sim_worst_makespan_over_lower_bound=$worst"
