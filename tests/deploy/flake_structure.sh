#!/bin/bash
# What of flake.nix can be checked here, offline and without nixpkgs:
# every Nix file parses, the flake pins nixos-25.05, and its outputs have
# the names the deployment relies on. nixpkgs is replaced by a value that
# fails if anything forces it, so this checks structure, not builds.
set -euo pipefail
src="$1" bin="${2:-}"
export NIX_CONFIG=$'substituters =\nexperimental-features = nix-command flakes'
for f in "$src/flake.nix" "$src"/nix/*.nix "$src"/nix/modules/*.nix "$src"/deploy/examples/*.nix; do
  nix-instantiate --parse "$f" > /dev/null
done
got=$(nix-instantiate --eval --strict --json -E "
  let
    flake = import $src/flake.nix;
    nixpkgs = { legacyPackages = throw \"nixpkgs was forced\"; lib = throw \"nixpkgs was forced\"; };
    out = flake.outputs { self = out; inherit nixpkgs; };
    names = builtins.attrNames;
  in {
    nixpkgs = flake.inputs.nixpkgs.url;
    linux = names out.packages.x86_64-linux;
    darwin = names out.packages.aarch64-darwin;
    shells = names out.devShells.x86_64-linux;
    modules = names out.nixosModules;
    modulesAreModules = builtins.all builtins.isFunction (builtins.attrValues out.nixosModules);
    apps = names out.apps.x86_64-linux;
  }")
want='{"apps":["push-image"],"darwin":["default","kiln"],"linux":["default","kiln","kiln-coordinator-image","kiln-worker-image"],"modules":["coordinator","worker"],"modulesAreModules":true,"nixpkgs":"github:NixOS/nixpkgs/nixos-25.05","shells":["default","infra"]}'
if [[ "$got" != "$want" ]]; then
  echo "flake outputs differ"
  echo " got: $got"
  echo "want: $want"
  exit 1
fi
echo "flake.nix: parses, pins nixos-25.05, outputs $got"

# The modules' units, evaluated with a stand-in lib (tests/deploy/modules_eval.nix).
units=$(nix-instantiate --eval --strict --json "$src/tests/deploy/modules_eval.nix" --argstr src "$src")
expect() {
  grep -qF -- "$1" <<< "$units" || { echo "the modules' units lack: $1"; echo "$units"; exit 1; }
}
expect "'--state-dir=%S/kiln-coordinator'"
expect "'--push-allow=rg.fr-par.scw.cloud/team/*'"
expect '"coordinatorCredentials":["tls-cert:/etc/kiln/node.pem","tls-key:/etc/kiln/node.key","tls-ca:/etc/kiln/ca.pem"]'
expect '"coordinatorFirewall":[7600]'
expect "'--labels=pool=orbstack,region=fr-par'"
expect '"registry-auth:/etc/kiln/registry-auth.json"'
expect '"workerUser":"kiln-worker"'
# Every flag the modules pass is one the daemons take.
if [[ -n "$bin" ]]; then
  for daemon in kiln-coordinator kiln-worker; do
    known=$({ "$bin/$daemon" --help 2>&1 || true; } | grep -oE -- '--[a-z][a-z-]*' | sort -u)
    key=$([[ $daemon == kiln-coordinator ]] && echo coordinatorExec || echo workerExec)
    used=$(grep -oE "\"$key\":\"[^\"]*\"" <<< "$units" | grep -oE -- "'--[a-z-]+" | tr -d "'" | sort -u)
    for flag in $used; do
      grep -qx -- "$flag" <<< "$known" || { echo "$daemon takes no $flag (the NixOS module passes it)"; exit 1; }
    done
  done
  echo "every flag the modules pass is one the daemons take"
fi
