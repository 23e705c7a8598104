# nixosModules.worker: services.kiln-worker. Builds run in the host's Nix
# daemon as the `kiln-worker` user.
self:
{ config, lib, pkgs, ... }:
let
  cfg = config.services.kiln-worker;
  tls = import ./tls.nix { inherit lib; };
  shared = import ./options.nix { inherit lib self pkgs; };
  inherit (lib) mkEnableOption mkOption mkIf types;
in {
  options.services.kiln-worker = {
    enable = mkEnableOption "a Kiln build farm worker";
    package = shared.package;
    coordinator = mkOption {
      type = types.str;
      example = "kiln.example.eu:7600";
      description = "The coordinator's gRPC address.";
    };
    maxJobs = mkOption {
      type = types.ints.positive;
      default = 2;
      description = "Builds run at once.";
    };
    labels = mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = { pool = "orbstack"; region = "fr-par"; };
      description = "Labels jobs can pin (kiln build --label).";
    };
    metricsListen = shared.metricsListen "127.0.0.1:9601";
    tls = tls.options;
    registryAuthFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      description = ''
        A docker-style config.json with the registry credentials pushes use (Scaleway: user `nologin`, the
        secret key as password). Read by systemd (LoadCredential), never copied to the Nix store.
      '';
    };
    trustedByNix = mkOption {
      type = types.bool;
      default = false;
      description = "Add the worker's user to nix.settings.trusted-users (needed for --nix-option overrides).";
    };
    extraFlags = shared.extraFlags "kiln-worker" [ "--blob-cache-mb=20480" ];
  };

  config = mkIf cfg.enable {
    users.users.kiln-worker = {
      isSystemUser = true;
      group = "kiln-worker";
      home = "/var/lib/kiln-worker";
      description = "Kiln build farm worker";
    };
    users.groups.kiln-worker = { };
    nix.settings.allowed-users = [ "kiln-worker" ];
    nix.settings.trusted-users = mkIf cfg.trustedByNix [ "kiln-worker" ];

    systemd.services.kiln-worker = {
      description = "Kiln build farm worker";
      wantedBy = [ "multi-user.target" ];
      after = [ "network-online.target" "nix-daemon.service" ];
      wants = [ "network-online.target" "nix-daemon.service" ];
      path = [ config.nix.package pkgs.git pkgs.gnutar pkgs.gzip pkgs.coreutils ];
      serviceConfig = import ./hardening.nix // {
        Type = "exec";
        ExecStart = lib.escapeShellArgs ([
          "${cfg.package}/bin/kiln-worker"
          "--coordinator=${cfg.coordinator}"
          "--metrics-listen=${cfg.metricsListen}"
          "--work-dir=%S/kiln-worker"
          "--max-jobs=${toString cfg.maxJobs}"
          "--log-format=json"
        ] ++ lib.optional (cfg.labels != { })
          "--labels=${lib.concatStringsSep "," (lib.mapAttrsToList (k: v: "${k}=${v}") cfg.labels)}"
          ++ lib.optional (cfg.registryAuthFile != null) "--registry-auth-file=%d/registry-auth"
          ++ tls.flags cfg.tls ++ cfg.extraFlags);
        User = "kiln-worker";
        Group = "kiln-worker";
        StateDirectory = "kiln-worker";
        StateDirectoryMode = "0700";
        LoadCredential = tls.credentials cfg.tls
          ++ lib.optional (cfg.registryAuthFile != null) "registry-auth:${toString cfg.registryAuthFile}";
        KillMode = "control-group";
        TimeoutStopSec = "90s";
      };
    };
  };
}
