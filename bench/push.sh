#!/usr/bin/env bash
# Pushing an image: Kiln's pusher (kiln push, the code workers run) vs
# `skopeo copy docker-archive:… docker://…`, same image, same local registry
# (Debian's docker-registry on 127.0.0.1, plain HTTP, no auth), one run.
#   first    a repository that has nothing yet (each contender its own)
#   again    the same image pushed again to the same repository
# Skopeo gets the uncompressed .tar (Debian's skopeo 1.9 fails on a gzipped
# docker-archive); skopeo compresses the layers too (Go's parallel gzip),
# and the compressed sizes of both are printed. The peer for throughput is
# one core's gzip -6 + sha256 over the same layers. BENCH_LAYERS (default
# 24) × BENCH_LAYER_MB (9). Then an image of one layer of real binaries
# (BENCH_BIG_LAYER_MB, 96), first push only: what one big store path costs.
# Kiln runs twice: at its default level (BENCH_GZIP_LEVEL to change it),
# and at --gzip-level=fast (ISA-L's igzip; "kiln_fast"), first pushes only.
# Headline: push_first_ratio_vs_skopeo (Kiln time / skopeo time; ≤ 0.5 is
# the target; ≤ 0.2 for push_again_ratio_vs_skopeo).
source "$(dirname "$0")/../scripts/lib.sh"
ensure_deps >&2
build_kiln >&2

layers=${BENCH_LAYERS:-24}
layer_mb=${BENCH_LAYER_MB:-9}
work=$(mktemp -d)
# A fresh, empty registry per round (skopeo remembers where it pushed a
# blob and would mount it from there the next time): $reg.
registry_pid=
start_registry() {
  local dir=$work/registry-$1 port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  cat >"$dir.yml" <<YML
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $dir
http:
  addr: 127.0.0.1:$port
YML
  docker-registry serve "$dir.yml" >"$dir.log" 2>&1 &
  registry_pid=$!
  reg=127.0.0.1:$port
  for _ in $(seq 100); do curl -sf "http://$reg/v2/" >/dev/null && break; sleep 0.1; done
}
# The registry's exit status is not ours: errexit would end the trap before the clean-up.
stop_registry() {
  [[ -n "$registry_pid" ]] || return 0
  kill "$registry_pid" 2>/dev/null || true
  wait "$registry_pid" 2>/dev/null || true
  registry_pid=
}
trap 'stop_registry; rm -rf "$work"' EXIT

# The image: layers half text-like (compressible, as binaries and sources
# are), half random, as a docker-archive like buildLayeredImage writes.
# The one-layer image (BENCH_BIG_LAYER_MB, 0 for none): one layer of real
# binaries, files of the shared libraries' directory in name order, as a
# closure's biggest store paths are.
big_mb=${BENCH_BIG_LAYER_MB:-96}
python3 - "$work/image" "$layers" "$layer_mb" "$work/big" "$big_mb" <<'PY'
import hashlib, io, json, os, random, sys, tarfile
out, n, mb, big_out, big_mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
rnd = random.Random(7)
words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 9))) for _ in range(4000)]

def synthetic(i):
    size = mb << 20
    text = b" ".join(rnd.choice(words) for _ in range(size // 12))[: size // 2]
    data = text + os.urandom(size - len(text))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        info = tarfile.TarInfo(f"layer{i}/data.bin"); info.size = len(data); info.mtime = 1
        t.addfile(info, io.BytesIO(data))
    return buf.getvalue()

def binaries():
    root, want = "/usr/lib/x86_64-linux-gnu", big_mb << 20
    buf, total = io.BytesIO(), 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if total >= want or os.path.islink(path) or not os.path.isfile(path):
                continue
            data = open(path, "rb").read()
            info = tarfile.TarInfo("lib/" + name); info.size = len(data); info.mtime = 1; info.mode = 0o555
            t.addfile(info, io.BytesIO(data))
            total += len(data)
    return buf.getvalue()

def image(out, layers):
    os.makedirs(out, exist_ok=True)
    diff_ids, paths = [], []
    for layer in layers:
        h = hashlib.sha256(layer).hexdigest()
        os.makedirs(f"{out}/{h}", exist_ok=True)
        open(f"{out}/{h}/layer.tar", "wb").write(layer)
        diff_ids.append("sha256:" + h); paths.append(f"{h}/layer.tar")
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    ch = hashlib.sha256(config).hexdigest()
    open(f"{out}/{ch}.json", "wb").write(config)
    json.dump([{"Config": f"{ch}.json", "RepoTags": ["bench:latest"], "Layers": paths}],
              open(f"{out}/manifest.json", "w"))

image(out, (synthetic(i) for i in range(n)))
if big_mb > 0:
    image(big_out, [binaries()])
PY
tar --sort=name -C "$work/image" -cf "$work/image.tar" .
image_bytes=$(stat -c %s "$work/image.tar")
if ((big_mb > 0)); then tar --sort=name -C "$work/big" -cf "$work/big.tar" .; fi

# Clocks read without a fork ($EPOCHREALTIME, bash 5): a date(1) process
# per reading added ~2 ms to every timed push, a tenth of a re-push.
now_ns() { local t=${EPOCHREALTIME/[.,]/}; echo "${t}000"; }
ms_since() {
  local end=${EPOCHREALTIME/[.,]/}
  awk -v a="$1" -v b="${end}000" 'BEGIN {printf "%.1f", (b - a) / 1e6}'
}

# One core's gzip -6 + sha256 over the layers: the single-core limit.
cat "$work"/image/*/layer.tar >/dev/null
t0=$(now_ns)
for f in "$work"/image/*/layer.tar; do gzip -6 -c "$f" | sha256sum >/dev/null; done
limit_ms=$(ms_since "$t0")

# timed ARRAY COMMAND...: runs COMMAND, adds its wall time (ms) to ARRAY.
# What the last push left to write back to disk is written first, so
# neither contender pays for the other's.
timed() {
  local -n into=$1
  shift
  local t0
  sync
  t0=${EPOCHREALTIME/[.,]/}000
  "$@" >/dev/null
  into+=("$(ms_since "$t0")")
}
skopeo_push() { skopeo copy -q --dest-tls-verify=false "docker-archive:$1" "docker://$reg/$2"; }
kiln_push() { "$KILN_BUILD/bin/kiln" push "$1" "$reg/$2" --insecure ${BENCH_GZIP_LEVEL:+--gzip-level=$BENCH_GZIP_LEVEL}; }
kiln_fast_push() { "$KILN_BUILD/bin/kiln" push "$1" "$reg/$2" --insecure --gzip-level=fast; }
# Compressed bytes of an image's layers as the registry holds them.
layer_mib() {
  skopeo inspect --raw --tls-verify=false "docker://$reg/$1" |
    python3 -c 'import json, sys; print("%.1f" % (sum(l["size"] for l in json.load(sys.stdin)["layers"]) / 1048576))'
}
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
# ratios A B: the ratios A[i] / B[i], comma-separated.
ratios() {
  local -n a=$1 b=$2
  local i out=()
  for i in "${!a[@]}"; do out+=("$(awk -v x="${a[$i]}" -v y="${b[$i]}" 'BEGIN {printf "%.3f", x / y}')"); done
  (IFS=,; echo "${out[*]}")
}

# BENCH_ROUNDS rounds (3), each on a fresh registry; the contenders take
# turns going first. Times and ratios are the rounds' medians.
rounds=${BENCH_ROUNDS:-3}
skopeo_first=() kiln_first=() kiln_fast_first=() skopeo_again=() kiln_again=()
skopeo_one=() kiln_one=() kiln_fast_one=()
for ((r = 1; r <= rounds; r++)); do
  start_registry "$r"
  export KILN_CACHE_DIR=$work/kiln-cache-$r
  order=(skopeo kiln kiln_fast)
  order=("${order[@]:$(((r - 1) % 3))}" "${order[@]:0:$(((r - 1) % 3))}")
  for who in "${order[@]}"; do
    timed "${who}_first" "${who}_push" "$work/image.tar" "bench/$who:first"
    [[ $who == kiln_fast ]] || timed "${who}_again" "${who}_push" "$work/image.tar" "bench/$who:again"
  done
  if ((big_mb > 0)); then
    for who in "${order[@]}"; do timed "${who}_one" "${who}_push" "$work/big.tar" "bench/$who-big:first"; done
  fi
  if ((r == 1)); then
    skopeo inspect --tls-verify=false "docker://$reg/bench/kiln:first" >/dev/null  # Kiln's image reads back.
    skopeo_first_mib=$(layer_mib bench/skopeo:first)
    kiln_first_mib=$(layer_mib bench/kiln:first)
    kiln_fast_first_mib=$(layer_mib bench/kiln_fast:first)
    if ((big_mb > 0)); then
      skopeo_one_layer_mib=$(layer_mib bench/skopeo-big:first)
      kiln_one_layer_mib=$(layer_mib bench/kiln-big:first)
      kiln_fast_one_layer_mib=$(layer_mib bench/kiln_fast-big:first)
    fi
  fi
  stop_registry
  rm -rf "$work/registry-$r" "$KILN_CACHE_DIR"
done
first_ratios=$(ratios kiln_first skopeo_first)
fast_first_ratios=$(ratios kiln_fast_first skopeo_first)
again_ratios=$(ratios kiln_again skopeo_again)

echo "layers=$layers"
echo "kiln_gzip_level=${BENCH_GZIP_LEVEL:-default}"
echo "image_mib=$(awk -v b="$image_bytes" 'BEGIN {printf "%.0f", b / 1048576}')"
echo "gzip6_sha256_one_core_ms=$limit_ms"
echo "rounds=$rounds"
echo "skopeo_first_ms=$(median "${skopeo_first[@]}")"
echo "kiln_first_ms=$(median "${kiln_first[@]}")"
echo "skopeo_again_ms=$(median "${skopeo_again[@]}")"
echo "kiln_again_ms=$(median "${kiln_again[@]}")"
echo "kiln_fast_first_ms=$(median "${kiln_fast_first[@]}")"
echo "skopeo_first_mib=$skopeo_first_mib"
echo "kiln_first_mib=$kiln_first_mib"
echo "kiln_fast_first_mib=$kiln_fast_first_mib"
if ((big_mb > 0)); then
  echo "one_layer_mib=$(awk -v b="$(stat -c %s "$work/big.tar")" 'BEGIN {printf "%.0f", b / 1048576}')"
  echo "skopeo_one_layer_ms=$(median "${skopeo_one[@]}")"
  echo "kiln_one_layer_ms=$(median "${kiln_one[@]}")"
  echo "skopeo_one_layer_mib=$skopeo_one_layer_mib"
  echo "kiln_one_layer_mib=$kiln_one_layer_mib"
  echo "kiln_fast_one_layer_ms=$(median "${kiln_fast_one[@]}")"
  echo "kiln_fast_one_layer_mib=$kiln_fast_one_layer_mib"
  one_ratios=$(ratios kiln_one skopeo_one)
  fast_one_ratios=$(ratios kiln_fast_one skopeo_one)
  echo "push_one_layer_ratios=$one_ratios"
  echo "push_one_layer_ratio_vs_skopeo=$(median ${one_ratios//,/ })"
  echo "push_fast_one_layer_ratios=$fast_one_ratios"
  echo "push_fast_one_layer_ratio_vs_skopeo=$(median ${fast_one_ratios//,/ })"
fi
echo "kiln_first_fraction_of_one_core_limit=$(awk -v l="$limit_ms" -v k="$(median "${kiln_first[@]}")" 'BEGIN {printf "%.2f", l / k}')"
echo "push_again_ratios=$again_ratios"
echo "push_again_ratio_vs_skopeo=$(median ${again_ratios//,/ })"
echo "push_fast_first_ratios=$fast_first_ratios"
echo "push_fast_first_ratio_vs_skopeo=$(median ${fast_first_ratios//,/ })"
echo "push_first_ratios=$first_ratios"
echo "push_first_ratio_vs_skopeo=$(median ${first_ratios//,/ })"
