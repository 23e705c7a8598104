#!/bin/sh
# The coordinator's structure, checked: its state owners' headers bring in
# no RocksDB, gRPC or prometheus header (even transitively), no header of
# coordinator/ includes another in a circle, and no file there passes the
# size at which it stops being read as one piece.
# Usage: structure_test.sh SOURCE_DIR PROTO_INCLUDE_DIR CXX
set -eu
src=$1 gen=$2 cxx=$3
fail=0

for header in work_graph.h worker_registry.h job_journal.h submission_validator.h scheduler.h \
              scheduling_inputs.h source_reader.h blob_store.h state_store.h; do
  deps=$("$cxx" -std=c++20 -M -x c++ -I"$src" -I"$gen" "$src/coordinator/$header")
  bad=$(printf '%s\n' "$deps" | tr ' ' '\n' | grep -E '/(rocksdb|grpc|grpcpp|prometheus)/' | head -3 || true)
  if [ -n "$bad" ]; then
    echo "FAIL: coordinator/$header includes, through its includes: $bad"
    fail=1
  fi
done

# Edges "includer included" between coordinator files; tsort finds loops.
edges=$(cd "$src" && for f in coordinator/*.h; do
  grep -o '^#include "coordinator/[a-z_]*\.h"' "$f" | sed 's/^#include "\(.*\)"$/\1/' |
    while read -r dep; do echo "$f $dep"; done
done)
if ! printf '%s\n' "$edges" | tsort >/dev/null 2>/tmp/kiln-tsort.$$; then
  echo "FAIL: coordinator headers include each other in a circle:"
  cat /tmp/kiln-tsort.$$
  fail=1
fi
rm -f /tmp/kiln-tsort.$$

for f in "$src"/coordinator/*.h "$src"/coordinator/*.cc; do
  n=$(wc -l <"$f")
  if [ "$n" -gt 750 ]; then
    echo "FAIL: $f has $n lines (split it by what its parts own)"
    fail=1
  fi
done
[ "$fail" -eq 0 ] && echo "coordinator structure: ok"
exit "$fail"
