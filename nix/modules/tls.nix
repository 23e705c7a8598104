# The TLS options both modules share, and what they turn into.
{ lib }:
let inherit (lib) mkOption types;
in {
  options = {
    certFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      description = "This daemon's certificate (PEM), from deploy/pki/kiln-pki. Null: plaintext, loopback only.";
    };
    keyFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      description = "Its private key. Read by systemd (LoadCredential), never copied to the Nix store.";
    };
    caFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      description = "The farm's CA certificate.";
    };
  };
  # LoadCredential= entries and the flags that read them.
  credentials = tls: lib.optionals (tls.certFile != null) [
    "tls-cert:${toString tls.certFile}"
    "tls-key:${toString tls.keyFile}"
    "tls-ca:${toString tls.caFile}"
  ];
  flags = tls: lib.optionals (tls.certFile != null) [ "--tls-cert=%d/tls-cert" "--tls-key=%d/tls-key" "--tls-ca=%d/tls-ca" ];
}
