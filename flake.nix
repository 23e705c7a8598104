{
  # Kiln, built and deployed the way the services it serves are: pinned
  # nixpkgs, images from dockerTools.buildLayeredImage (no Dockerfile),
  # pushed with skopeo or Kiln itself.
  description = "Kiln: a distributed build farm for Nix";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.05";

  outputs = { self, nixpkgs }:
    let
      linux = "x86_64-linux";
      darwin = "aarch64-darwin";
      pkgsFor = system: nixpkgs.legacyPackages.${system};
      kilnFor = system: args: (pkgsFor system).callPackage ./nix/kiln.nix args;
      imagesFor = tag:
        let pkgs = pkgsFor linux;
        in pkgs.callPackage ./nix/images.nix { kiln = self.packages.${linux}.kiln; inherit tag; };
    in {
      packages.${linux} = {
        kiln = kilnFor linux { };
        default = self.packages.${linux}.kiln;
        kiln-coordinator-image = (imagesFor "latest").coordinator;
        kiln-worker-image = (imagesFor "latest").worker;
      };
      # Developers' laptops: the client only (kiln, kiln-push); workers are
      # x86_64-linux.
      packages.${darwin} = {
        kiln = kilnFor darwin { cliOnly = true; };
        default = self.packages.${darwin}.kiln;
      };

      devShells.${linux} = let pkgs = pkgsFor linux; in {
        # Build and test Kiln: the toolchain, the libraries, the test peers.
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${linux}.kiln ];
          packages = with pkgs; [ gtest clang-tools gdb skopeo docker-distribution prometheus nix tmux ];
        };
        # Operate it: push images, manage the EU infrastructure.
        infra = pkgs.mkShell {
          packages = with pkgs; [ skopeo pulumi-bin scaleway-cli jq openssl ];
        };
      };
      devShells.${darwin}.default = let pkgs = pkgsFor darwin; in pkgs.mkShell {
        inputsFrom = [ self.packages.${darwin}.kiln ];
      };

      nixosModules = {
        coordinator = import ./nix/modules/coordinator.nix self;
        worker = import ./nix/modules/worker.nix self;
      };

      # nix run .#push-image -- testing|production: Kiln's two images to
      # $KILN_IMAGE_REPOSITORY (e.g. rg.fr-par.scw.cloud/sanmarcsoft), as
      # kiln-coordinator:TAG and kiln-worker:TAG, with skopeo and
      # --dest-creds nologin:$SCW_SECRET_KEY.
      apps.${linux}.push-image = let
        pkgs = pkgsFor linux;
        images = imagesFor "latest";
        script = pkgs.writeShellApplication {
          name = "kiln-push-image";
          runtimeInputs = [ pkgs.skopeo ];
          text = ''
            tag="''${1:-testing}"
            case "$tag" in testing|production) ;; *) echo "usage: push-image testing|production" >&2; exit 2 ;; esac
            repo="''${KILN_IMAGE_REPOSITORY:?set KILN_IMAGE_REPOSITORY, e.g. rg.fr-par.scw.cloud/sanmarcsoft}"
            creds="nologin:''${SCW_SECRET_KEY:?set SCW_SECRET_KEY}"
            skopeo copy --dest-creds "$creds" docker-archive:${images.coordinator} "docker://$repo/kiln-coordinator:$tag"
            skopeo copy --dest-creds "$creds" docker-archive:${images.worker} "docker://$repo/kiln-worker:$tag"
          '';
        };
      in { type = "app"; program = "${script}/bin/kiln-push-image"; };
    };
}
