# Kiln's own OCI images, built the way the services Kiln serves build theirs:
# dockerTools.buildLayeredImage, no Dockerfile.
{ lib, dockerTools, cacert, kiln, nix, bashInteractive, coreutils, gnutar, gzip, git, tag ? "latest" }:

{
  # The coordinator runs as an unprivileged user; its state is a volume.
  coordinator = dockerTools.buildLayeredImage {
    name = "kiln-coordinator";
    inherit tag;
    contents = [ kiln cacert ];
    extraCommands = ''
      mkdir -p var/lib/kiln-coordinator tmp
      chmod 1777 tmp
    '';
    fakeRootCommands = ''
      chown 65534:65534 var/lib/kiln-coordinator
      chmod 0700 var/lib/kiln-coordinator
    '';
    config = {
      User = "65534:65534";
      Entrypoint = [ "${kiln}/bin/kiln-coordinator" ];
      Cmd = [ "--listen=0.0.0.0:7600" "--metrics-listen=0.0.0.0:9600" "--state-dir=/var/lib/kiln-coordinator"
              "--log-format=json" ];
      ExposedPorts = { "7600/tcp" = { }; "9600/tcp" = { }; };
      Volumes = { "/var/lib/kiln-coordinator" = { }; };
      Env = [ "SSL_CERT_FILE=${cacert}/etc/ssl/certs/ca-bundle.crt" ];
    };
  };

  # The worker carries Nix and runs builds in the container's own store:
  # Nix's single-user mode wants to own /nix, so this image runs as root
  # (a rootless runtime, e.g. podman, maps that to an unprivileged user).
  worker = dockerTools.buildLayeredImage {
    name = "kiln-worker";
    inherit tag;
    contents = [ kiln nix cacert bashInteractive coreutils gnutar gzip git ];
    extraCommands = ''
      mkdir -p var/lib/kiln-worker tmp etc/nix
      chmod 1777 tmp
      cat > etc/nix/nix.conf <<'CONF'
      experimental-features = nix-command flakes
      build-users-group =
      sandbox = false
      CONF
    '';
    config = {
      Entrypoint = [ "${kiln}/bin/kiln-worker" ];
      Cmd = [ "--work-dir=/var/lib/kiln-worker" "--metrics-listen=0.0.0.0:9601" "--log-format=json" ];
      ExposedPorts = { "9601/tcp" = { }; };
      Volumes = { "/var/lib/kiln-worker" = { }; "/nix" = { }; };
      Env = [
        "SSL_CERT_FILE=${cacert}/etc/ssl/certs/ca-bundle.crt"
        "NIX_SSL_CERT_FILE=${cacert}/etc/ssl/certs/ca-bundle.crt"
        "PATH=/bin:${lib.makeBinPath [ nix coreutils gnutar gzip git bashInteractive ]}"
      ];
    };
  };
}
