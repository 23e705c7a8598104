#!/bin/bash
# The client builds without the daemons' libraries (-DKILN_CLI_ONLY=ON, what
# the flake builds for aarch64-darwin). Cheap form of that promise:
#   1. the CLI-only configuration configures (CMake finds no RocksDB,
#      prometheus-cpp or civetweb and asks for none);
#   2. the kiln and kiln-push built here contain none of their code, so the
#      CLI-only link has nothing missing. (A full CLI-only build takes ~2 min
#      on two cores; docs/OPERATIONS.md gives the commands.)
set -euo pipefail
src="$1" bin="$2"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cmake -S "$src" -B "$dir" -G Ninja -DKILN_CLI_ONLY=ON -DKILN_STATIC_CLI=OFF > "$dir/configure.log" 2>&1 || {
  cat "$dir/configure.log"
  exit 1
}
if grep -qiE 'rocksdb|prometheus|civetweb' "$dir/CMakeCache.txt"; then
  echo "the CLI-only configuration looked for a daemon's library:"
  grep -iE 'rocksdb|prometheus|civetweb' "$dir/CMakeCache.txt"
  exit 1
fi
for b in kiln kiln-push; do
  if nm -C "$bin/$b" | grep -qE 'rocksdb::|prometheus::|mg_start|kiln::MetricsHttpServer'; then
    echo "$b links code of the daemons' libraries:"
    nm -C "$bin/$b" | grep -E 'rocksdb::|prometheus::|mg_start|kiln::MetricsHttpServer' | head
    exit 1
  fi
done
echo "the client configures alone and links none of the daemons' libraries"
