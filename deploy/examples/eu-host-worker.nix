# An EU host worker on NixOS, with Kiln's flake as an input:
#   imports = [ kiln.nixosModules.worker ./eu-host-worker.nix ];
{ ... }:
{
  services.kiln-worker = {
    enable = true;
    coordinator = "kiln.internal.example.eu:7600";
    maxJobs = 4;
    labels = { region = "fr-par"; pool = "eu"; };
    metricsListen = "10.0.0.21:9601";
    tls = {
      certFile = "/etc/kiln/worker.pem";
      keyFile = "/etc/kiln/worker.key";
      caFile = "/etc/kiln/ca.pem";
    };
    registryAuthFile = "/etc/kiln/registry-auth.json";
    extraFlags = [ "--blob-cache-mb=20480" ];
  };
  nix.gc = { automatic = true; dates = "daily"; options = "--delete-older-than 7d"; };
}
