#!/usr/bin/env bash
# The farm store against Nix's own binary-cache code, on one closure of
# BENCH_CACHE_PATHS store paths (default 2,000) and about BENCH_CACHE_MIB MiB
# (default 300): half compressible text, half incompressible bytes, and a
# root that references them all. Each side works in a store of its own (a
# mount namespace with a private /nix, as on its own machine).
#   upload      the worker's upload to the farm store (kiln-cache-bench upload:
#               the code a worker runs after a build, over gRPC on loopback)
#               vs `nix copy --to file://DIR?compression=zstd` (signed)
#   unchanged   the same upload again: every path is there already
#   substitute  an empty store fetching the closure from the farm through a
#               worker's relay (`nix copy --from RELAY`) vs `nix copy --from
#               file://DIR` (both check signatures); also stock Nix from the
#               coordinator's HTTP listener, and both as a build substitutes
#               (`nix-store --realise` with the cache as a substituter)
#   kiln copy   `kiln copy ROOT` into an empty store: the farm's NARs over
#               gRPC, then stock `nix copy --from file://` of them (how people
#               and CI fetch)
# Headline: cache_substitute_ratio_vs_nix_copy (`kiln copy` time / `nix copy
# --from file://` time; ≤ 1.0: at least as fast as Nix's local binary cache).
source "$(dirname "$0")/../scripts/lib.sh"
ensure_deps >&2
build_kiln >&2

paths=${BENCH_CACHE_PATHS:-2000}
mib=${BENCH_CACHE_MIB:-300}
work=$(mktemp -d)
trap 'stop_farm_at_exit "$work/farm" "$work"' EXIT
KILN_FARM_COORDINATOR_FLAGS="--cache-listen=127.0.0.1:0" start_farm "$work/farm" 127.0.0.1:0 127.0.0.1:0 0 0 >&2
cache=$(json_field "$work/farm/coordinator.ready" cache)

# in_store DIR CMD...: CMD with DIR as its /nix.
in_store() {
  local dir=$1
  shift
  mkdir -p "$dir"
  NIX_CONFIG=$'substituters =\nbuild-users-group =\nexperimental-features = nix-command' \
    /usr/bin/unshare --mount --propagation private /bin/sh -c \
    'mount --bind "$0" /nix && nix-store --init && exec "$@"' "$dir" "$@"
}

# The closure's contents, then the store paths (one nix-store --add for many).
log "making $paths paths, ~$mib MiB" >&2
src=$work/src
mkdir -p "$src"
per_path=$((mib * 1024 * 1024 / paths))
python3 - "$src" "$paths" "$per_path" <<'PY'
import os, sys
src, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
words = b"derivation output closure reference substitute narinfo signature store path worker farm\n"
for i in range(n):
    d = os.path.join(src, f"p{i:05d}")
    os.makedirs(os.path.join(d, "share"))
    if i % 2 == 0:
        body = (b"%d " % i + words) * (size // (len(words) + 6) + 1)
        open(os.path.join(d, "share", "doc.txt"), "wb").write(body[:size])
    else:
        open(os.path.join(d, "share", "blob.bin"), "wb").write(os.urandom(size))
    open(os.path.join(d, "id"), "w").write(f"{i}\n")
PY
builder=$work/builder-nix
mkdir -p "$work/keys"
nix-store --generate-binary-cache-key bench-file-1 "$work/keys/secret" "$work/keys/public"
cat >"$work/add.sh" <<'SH'
set -e
find "$1" -mindepth 1 -maxdepth 1 | sort | xargs -n 500 nix-store --add > "$2"
SH
in_store "$builder" /bin/sh "$work/add.sh" "$src" "$work/paths.txt"
cat >"$work/root.nix" <<NIX
let paths = map builtins.storePath (builtins.filter (p: p != "" && builtins.isString p)
  (builtins.split "\n" (builtins.readFile $work/paths.txt)));
in derivation {
  name = "bench-closure-root"; system = "x86_64-linux"; builder = "/bin/sh";
  args = [ "-c" "echo \${toString paths} > \$out" ];
}
NIX
root=$(in_store "$builder" nix-build --no-out-link "$work/root.nix")
closure=$(in_store "$builder" nix-store -qR "$root" | wc -l)
nar_bytes=$(in_store "$builder" nix path-info -S "$root" | awk '{print $2}')

# Upload: Kiln vs nix copy --to file:// (zstd, signed).
log "uploading" >&2
t0=$(now_ns)
in_store "$builder" nix copy --to "file://$work/filecache?compression=zstd&secret-key=$work/keys/secret" "$root"
nix_upload_ms=$(ms_since "$t0")
in_store "$builder" "$KILN_BUILD/bin/kiln-cache-bench" --coordinator="$KILN_COORDINATOR" --mode=upload \
  --root="$root" --prefix=upload >"$work/upload.txt"
in_store "$builder" "$KILN_BUILD/bin/kiln-cache-bench" --coordinator="$KILN_COORDINATOR" --mode=upload \
  --root="$root" --prefix=unchanged >"$work/unchanged.txt"
kiln_upload_ms=$(sed -n 's/^upload_ms=//p' "$work/upload.txt")
unchanged_ms=$(sed -n 's/^unchanged_ms=//p' "$work/unchanged.txt")
grep -q "^upload_paths_sent=$closure$" "$work/upload.txt" || { cat "$work/upload.txt" >&2; exit 1; }
grep -q "^unchanged_paths_sent=0$" "$work/unchanged.txt" || { cat "$work/unchanged.txt" >&2; exit 1; }

# Substitution into empty stores.
log "substituting" >&2
key=$(cat "$work/keys/public")
t0=$(now_ns)
in_store "$work/nix-client" nix copy --from "file://$work/filecache" --option trusted-public-keys "$key" "$root"
nix_substitute_ms=$(ms_since "$t0")
in_store "$work/kiln-client" "$KILN_BUILD/bin/kiln-cache-bench" --coordinator="$KILN_COORDINATOR" \
  --mode=substitute --command=copy --root="$root" --prefix=substitute >"$work/substitute.txt"
kiln_substitute_ms=$(sed -n 's/^substitute_ms=//p' "$work/substitute.txt")
sed -n 's/^substitute_relay_/cache_relay_/p' "$work/substitute.txt"
t0=$(now_ns)
in_store "$work/copy-client" "$KILN_BUILD/bin/kiln" copy "$root" 2>"$work/copy.log" || { cat "$work/copy.log" >&2; exit 1; }
kiln_copy_ms=$(ms_since "$t0")
farm_key=$("$KILN_BUILD/bin/kiln-coordinator" cache public-key --state-dir="$work/farm/coordinator")
t0=$(now_ns)
in_store "$work/http-client" nix copy --from "http://$cache" --option trusted-public-keys "$farm_key" "$root"
http_substitute_ms=$(ms_since "$t0")
# As a build substitutes: nix-store --realise with the cache as a substituter,
# through a worker's relay and straight from the coordinator's listener.
in_store "$work/realise-client" "$KILN_BUILD/bin/kiln-cache-bench" --coordinator="$KILN_COORDINATOR" \
  --mode=substitute --command=realise --root="$root" --prefix=realise >"$work/realise.txt"
relay_realise_ms=$(sed -n 's/^realise_ms=//p' "$work/realise.txt")
in_store "$work/http-realise-client" "$KILN_BUILD/bin/kiln-cache-bench" --coordinator="$KILN_COORDINATOR" \
  --mode=substitute --command=realise --root="$root" --prefix=http_realise --cache_url="http://$cache" \
  --cache_key="$farm_key" >"$work/http-realise.txt"
http_realise_ms=$(sed -n 's/^http_realise_ms=//p' "$work/http-realise.txt")
for c in nix-client kiln-client copy-client http-client realise-client http-realise-client; do
  n=$(in_store "$work/$c" nix-store -qR "$root" | wc -l)
  [[ $n == "$closure" ]] || { echo "$c holds $n of $closure paths" >&2; exit 1; }
done

farm_bytes=$(du -sb "$work/farm/coordinator/rocksdb/nar" | cut -f1)
file_bytes=$(du -sb "$work/filecache/nar" | cut -f1)
echo "cache_closure_paths=$closure"
echo "cache_closure_nar_bytes=$nar_bytes"
echo "cache_farm_nar_files_bytes=$farm_bytes"
echo "cache_nix_file_nar_bytes=$file_bytes"
echo "cache_upload_ms=$kiln_upload_ms"
echo "cache_nix_copy_to_file_ms=$nix_upload_ms"
echo "cache_upload_ratio_vs_nix_copy=$(awk -v a="$kiln_upload_ms" -v b="$nix_upload_ms" 'BEGIN {printf "%.2f", a / b}')"
echo "cache_unchanged_upload_ms=$unchanged_ms"
echo "cache_relay_substitute_ms=$kiln_substitute_ms"
echo "cache_kiln_copy_ms=$kiln_copy_ms"
echo "cache_http_substitute_ms=$http_substitute_ms"
echo "cache_relay_realise_ms=$relay_realise_ms"
echo "cache_http_realise_ms=$http_realise_ms"
echo "cache_nix_copy_from_file_ms=$nix_substitute_ms"
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
echo "cache_http_substitute_ratio_vs_nix_copy=$(ratio "$http_substitute_ms" "$nix_substitute_ms")"
echo "cache_relay_substitute_ratio_vs_nix_copy=$(ratio "$kiln_substitute_ms" "$nix_substitute_ms")"
echo "cache_relay_realise_ratio_vs_http_realise=$(ratio "$relay_realise_ms" "$http_realise_ms")"
echo "cache_substitute_ratio_vs_nix_copy=$(ratio "$kiln_copy_ms" "$nix_substitute_ms")"
