{
  # First draft: builds Kiln itself the way the services it serves are built.
  # The full flake (images, NixOS modules, dev shells, push app) is issue 9.
  description = "Kiln: a distributed build farm for Nix";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.05";

  outputs = { self, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
    in {
      packages.${system}.kiln = pkgs.stdenv.mkDerivation {
        pname = "kiln";
        version = "0.1.0";
        src = ./.;
        nativeBuildInputs = with pkgs; [ cmake ninja pkg-config protobuf grpc ];
        buildInputs = with pkgs; [
          grpc protobuf abseil-cpp rocksdb openssl prometheus-cpp curl libarchive libdeflate nlohmann_json
        ];
        cmakeFlags = [ "-DKILN_BUILD_TESTS=OFF" ];
        installPhase = ''
          mkdir -p $out/bin
          cp bin/kiln bin/kiln-coordinator bin/kiln-worker $out/bin/
        '';
      };
      packages.${system}.default = self.packages.${system}.kiln;
    };
}
