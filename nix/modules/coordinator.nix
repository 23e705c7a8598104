# nixosModules.coordinator: services.kiln-coordinator.
self:
{ config, lib, pkgs, ... }:
let
  cfg = config.services.kiln-coordinator;
  tls = import ./tls.nix { inherit lib; };
  shared = import ./options.nix { inherit lib self pkgs; };
  inherit (lib) mkEnableOption mkOption mkIf types;
  port = address: lib.toInt (lib.last (lib.splitString ":" address));
in {
  options.services.kiln-coordinator = {
    enable = mkEnableOption "the Kiln build farm coordinator";
    package = shared.package;
    listen = mkOption {
      type = types.str;
      default = "127.0.0.1:7600";
      description = "gRPC address for workers and clients. Off loopback it needs `tls`.";
    };
    metricsListen = shared.metricsListen "127.0.0.1:9600";
    stateDirectory = mkOption {
      type = types.str;
      default = "kiln-coordinator";
      description = "The state's directory under /var/lib (RocksDB, CAS, admin socket).";
    };
    tls = tls.options;
    pushAllow = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "rg.fr-par.scw.cloud/sanmarcsoft/*" ];
      description = "Image push targets jobs may name (globs over REGISTRY/REPOSITORY[:TAG]).";
    };
    logRetentionKb = mkOption {
      type = types.ints.unsigned;
      default = 1048576;
      description = "Compressed build logs kept for `kiln log`, in KiB.";
    };
    extraFlags = shared.extraFlags "kiln-coordinator" [ "--lease=2m" "--cas-max-gb=200" ];
    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the gRPC port.";
    };
  };

  config = mkIf cfg.enable {
    systemd.services.kiln-coordinator = {
      description = "Kiln build farm coordinator";
      wantedBy = [ "multi-user.target" ];
      after = [ "network-online.target" ];
      wants = [ "network-online.target" ];
      serviceConfig = import ./hardening.nix // {
        Type = "exec";
        ExecStart = lib.escapeShellArgs ([
          "${cfg.package}/bin/kiln-coordinator"
          "--listen=${cfg.listen}"
          "--metrics-listen=${cfg.metricsListen}"
          "--state-dir=%S/${cfg.stateDirectory}"
          "--log-format=json"
          "--log-retention-kb=${toString cfg.logRetentionKb}"
        ] ++ lib.optional (cfg.pushAllow != [ ]) "--push-allow=${lib.concatStringsSep "," cfg.pushAllow}"
          ++ tls.flags cfg.tls ++ cfg.extraFlags);
        DynamicUser = true;
        StateDirectory = cfg.stateDirectory;
        StateDirectoryMode = "0700";
        LoadCredential = tls.credentials cfg.tls;
        TimeoutStopSec = "60s";
        MemoryDenyWriteExecute = true;
        SystemCallFilter = [ "@system-service" "~@privileged @resources" ];
      };
    };
    networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall [ (port cfg.listen) ];
  };
}
