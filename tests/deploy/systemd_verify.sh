#!/bin/bash
# systemd-analyze verify on deploy/systemd's units, with ExecStart pointed at
# the binaries just built (verify checks they exist). Any warning fails:
# systemd ignores a misspelt key or a bad value with a warning and exit 0.
set -euo pipefail
src="$1" bin="$2"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
for unit in kiln-coordinator.service kiln-worker.service; do
  sed "s|/usr/local/bin/|$bin/|" "$src/deploy/systemd/$unit" > "$dir/$unit"
done
out=$(cd "$dir" && systemd-analyze verify ./kiln-coordinator.service ./kiln-worker.service 2>&1) || {
  echo "$out"
  exit 1
}
if [[ -n "$out" ]]; then
  echo "systemd-analyze verify warned:"
  echo "$out"
  exit 1
fi
echo "both units verify cleanly"

# The example environment files name only flags the daemons take.
for env in "$src"/deploy/systemd/*.env "$src"/deploy/examples/*.env; do
  daemon=kiln-worker
  [[ $(basename "$env") == coordinator* ]] && daemon=kiln-coordinator
  known=$({ "$bin/$daemon" --help 2>&1 || true; } | grep -oE -- '--[a-z][a-z-]*' | sort -u)
  flags=$(grep -E '^KILN_FLAGS=' "$env" | grep -oE -- '--[a-z-]+' || true)
  for flag in $flags; do
    grep -qx -- "$flag" <<< "$known" || { echo "$env: $daemon takes no $flag"; exit 1; }
  done
done
echo "the example environment files name only real flags"
