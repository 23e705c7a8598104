# Evaluates the NixOS modules' systemd units without nixpkgs: `lib` here is a
# stand-in with just the functions the modules call (options become plain
# values). It checks what the modules make of their options, not NixOS's
# option merging. Used by tests/deploy/flake_structure.sh.
{ src }:
let
  escapeShellArg = arg: "'${builtins.replaceStrings [ "'" ] [ "'\\''" ] (toString arg)}'";
  lib = {
    mkEnableOption = description: { inherit description; };
    mkOption = option: option;
    mkIf = condition: value: if condition then value else { };
    literalExpression = text: text;
    types = {
      str = "str"; path = "path"; package = "package"; bool = "bool";
      nullOr = t: t; listOf = t: t; attrsOf = t: t;
      ints = { unsigned = "unsigned"; positive = "positive"; };
    };
    optional = condition: element: if condition then [ element ] else [ ];
    optionals = condition: list: if condition then list else [ ];
    escapeShellArgs = args: builtins.concatStringsSep " " (map escapeShellArg args);
    concatStringsSep = builtins.concatStringsSep;
    mapAttrsToList = f: attrs: map (name: f name attrs.${name}) (builtins.attrNames attrs);
    toInt = builtins.fromJSON;
    last = list: builtins.elemAt list (builtins.length list - 1);
    splitString = sep: text: builtins.filter builtins.isString (builtins.split sep text);
  };
  self = { packages.x86_64-linux.kiln = "/nix/store/kiln"; };
  pkgs = {
    stdenv.hostPlatform.system = "x86_64-linux";
    git = "git"; gnutar = "gnutar"; gzip = "gzip"; coreutils = "coreutils";
  };
  tls = {
    certFile = "/etc/kiln/node.pem"; keyFile = "/etc/kiln/node.key"; caFile = "/etc/kiln/ca.pem";
  };
  coordinator = (import "${src}/nix/modules/coordinator.nix" self) {
    inherit lib pkgs;
    config.services.kiln-coordinator = {
      enable = true; package = "/nix/store/kiln"; listen = "10.0.0.5:7600"; metricsListen = "127.0.0.1:9600";
      stateDirectory = "kiln-coordinator"; inherit tls; pushAllow = [ "rg.fr-par.scw.cloud/team/*" ];
      logRetentionKb = 4096; extraFlags = [ "--lease=2m" ]; openFirewall = true;
    };
  };
  worker = (import "${src}/nix/modules/worker.nix" self) {
    inherit lib pkgs;
    config.nix.package = "nix";
    config.services.kiln-worker = {
      enable = true; package = "/nix/store/kiln"; coordinator = "kiln.example.eu:7600"; maxJobs = 4;
      labels = { pool = "orbstack"; region = "fr-par"; }; metricsListen = "127.0.0.1:9601"; inherit tls;
      registryAuthFile = "/etc/kiln/registry-auth.json"; trustedByNix = false; extraFlags = [ ];
    };
  };
  c = coordinator.config.systemd.services.kiln-coordinator.serviceConfig;
  w = worker.config.systemd.services.kiln-worker.serviceConfig;
in {
  coordinatorExec = c.ExecStart;
  coordinatorCredentials = c.LoadCredential;
  coordinatorFirewall = coordinator.config.networking.firewall.allowedTCPPorts;
  coordinatorUser = c.DynamicUser;
  workerExec = w.ExecStart;
  workerCredentials = w.LoadCredential;
  workerUser = w.User;
  workerAllowed = worker.config.nix.settings.allowed-users;
  options = builtins.attrNames (coordinator.options.services.kiln-coordinator // worker.options.services.kiln-worker);
}
