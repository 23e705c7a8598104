# Options both Kiln modules have, made the same way.
{ lib, self, pkgs }:
let inherit (lib) mkOption types;
in {
  package = mkOption {
    type = types.package;
    default = self.packages.${pkgs.stdenv.hostPlatform.system}.kiln;
    defaultText = lib.literalExpression "kiln.packages.\${system}.kiln";
    description = "The Kiln package.";
  };
  metricsListen = default: mkOption {
    type = types.str;
    inherit default;
    description = "HTTP address of /metrics, /healthz and /readyz.";
  };
  extraFlags = daemon: example: mkOption {
    type = types.listOf types.str;
    default = [ ];
    inherit example;
    description = "More ${daemon} flags.";
  };
}
