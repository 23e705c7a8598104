# Kiln built with nixpkgs' toolchain and libraries. `cliOnly` builds the
# client alone (`kiln`, `kiln-push`): what a laptop needs, also on
# aarch64-darwin, without RocksDB, the metrics server or Nix itself.
{ lib, stdenv, cmake, ninja, pkg-config, protobuf, grpc, abseil-cpp, openssl, nlohmann_json, cli11, curl, libarchive
, libdeflate, zstd, isa-l, rocksdb, prometheus-cpp, civetweb, jemalloc, cliOnly ? false }:

let
  # ISA-L (gzip level "fast") is Linux's: nixpkgs marks it broken on
  # aarch64-darwin, where the laptop CLI builds without it.
  withIsal = stdenv.isLinux;
in

stdenv.mkDerivation {
  pname = if cliOnly then "kiln-cli" else "kiln";
  version = "0.1.0";
  src = lib.cleanSourceWith {
    src = ../.;
    # Sources only: no build trees, benchmarks' outputs or editor files.
    filter = path: type:
      let base = baseNameOf path;
      in !(type == "directory" && lib.elem base [ "build" "build-san" ".git" "result" ]);
  };
  nativeBuildInputs = [ cmake ninja pkg-config protobuf grpc ];
  buildInputs = [ grpc protobuf abseil-cpp openssl nlohmann_json cli11 curl libarchive libdeflate zstd ]
    ++ lib.optional withIsal isa-l
    ++ lib.optionals (!cliOnly) [ rocksdb prometheus-cpp civetweb jemalloc ];
  cmakeFlags = [
    "-DKILN_BUILD_TESTS=OFF"
    # nixpkgs links what it links; the static CLI is for Debian's many
    # small shared libraries.
    "-DKILN_STATIC_CLI=OFF"
  ] ++ lib.optional cliOnly "-DKILN_CLI_ONLY=ON"
    ++ lib.optional (!withIsal) "-DKILN_ISAL=OFF";
  installPhase = ''
    runHook preInstall
    install -Dm755 -t $out/bin bin/kiln bin/kiln-push
  '' + lib.optionalString (!cliOnly) ''
    install -Dm755 -t $out/bin bin/kiln-coordinator bin/kiln-worker
  '' + ''
    runHook postInstall
  '';
  meta = {
    description = "A distributed build farm for Nix";
    platforms = if cliOnly then lib.platforms.unix else lib.platforms.linux;
    mainProgram = "kiln";
  };
}
