#!/bin/bash
# CI for a monorepo of flakes, through a Kiln farm:
#   1. build every flake of the repository as one buildset (one upload of
#      the tree, the farm builds in parallel, unchanged targets come from
#      the result cache);
#   2. push every service's image (`oci-image`) as :testing and :$GIT_SHA,
#      from the workers straight to the registry.
# Run it from the repository's root. It writes kiln-build.json and
# kiln-push.json (the `kiln build --json` results) and exits non-zero when a
# build or push failed, with the CLI's code (1 failed, 2 refused, 3 the
# coordinator unreachable).
#
# Environment:
#   KILN_COORDINATOR       the farm (host:port)
#   KILN_TOKEN, KILN_TLS_CA  credentials when the farm requires them
#   KILN_PUSH_REPOSITORY   e.g. rg.fr-par.scw.cloud/sanmarcsoft; unset: no push
#   GIT_SHA                the extra tag (default: git rev-parse --short HEAD)
#   KILN                   the kiln binary (default: kiln on PATH)
set -uo pipefail

kiln="${KILN:-kiln}"
sha="${GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo dev)}"
status=0

echo "== build: every flake, one buildset"
# stdout: the results; stderr: one JSON event per line, kept as an artifact.
"$kiln" build --all-flakes --priority=ci --json > kiln-build.json 2> kiln-build.events.jsonl
code=$?
jq -r '.[] | "  \(.status)\t\(.installable)\t(job \(.jobId // "-") on \(.worker // "-"))"' kiln-build.json || code=3
if (( code != 0 )); then
  echo "build failed (exit $code):"
  jq -r '.[] | select(.status != "succeeded" and .status != "cached") | "  \(.installable): \(.error // .status)"' \
    kiln-build.json
  exit "$code"
fi

if [[ -z "${KILN_PUSH_REPOSITORY:-}" ]]; then
  echo "== push: skipped (KILN_PUSH_REPOSITORY is not set)"
  exit 0
fi

echo "== push: each service's image as :testing and :$sha"
echo "[]" > kiln-push.json
for flake in $(jq -r '.[].installable | sub("#.*$"; "")' kiln-build.json); do
  grep -q 'oci-image' "$flake/flake.nix" || continue
  service=$(basename "$flake")
  target="$KILN_PUSH_REPOSITORY/$service:testing"
  "$kiln" build "$flake#oci-image" --priority=ci --push="$target" --tag="$sha" --json \
    > kiln-push.one.json 2>> kiln-push.events.jsonl
  code=$?
  jq -s '.[0] + .[1]' kiln-push.json kiln-push.one.json > kiln-push.next.json && mv kiln-push.next.json kiln-push.json
  if (( code != 0 )); then
    echo "  failed  $service (exit $code): $(jq -r '.[0].error // "see kiln-push.events.jsonl"' kiln-push.one.json)"
    (( code > status )) && status=$code
  else
    echo "  pushed  $(jq -r '.[0].pushed.image' kiln-push.one.json) (tags testing, $sha)"
  fi
done
rm -f kiln-push.one.json
exit "$status"
