{
  description = "hello-api: a service image shaped like dockerTools.buildLayeredImage output";

  outputs = { self }:
    let
      system = "x86_64-linux";
      image = derivation {
        name = "hello-api-image.tar.gz";
        inherit system;
        builder = "/bin/sh";
        args = [ "-c" ''
          set -eu
          export PATH=/usr/bin:/bin
          # Reproducible tars: sorted names, fixed times and owners.
          tarflags="--sort=name --mtime=@1 --owner=0 --group=0 --numeric-owner"

          mkdir -p layers/1/app layers/2/etc img
          printf '#!/bin/sh\necho "hello-api listening on :8080"\n' > layers/1/app/server
          chmod 0755 layers/1/app/server
          printf 'hello-api:x:1000:1000::/app:/bin/sh\n' > layers/2/etc/passwd

          diff_ids=""
          layer_paths=""
          for n in 1 2; do
            echo "building layer $n"
            tar $tarflags -C layers/$n -cf layer.tar .
            sum=$(sha256sum layer.tar | cut -d' ' -f1)
            mkdir -p img/$sum
            mv layer.tar img/$sum/layer.tar
            diff_ids="$diff_ids''${diff_ids:+,}\"sha256:$sum\""
            layer_paths="$layer_paths''${layer_paths:+,}\"$sum/layer.tar\""
          done

          printf '{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/app/server"],"User":"1000"},"rootfs":{"type":"layers","diff_ids":[%s]}}' "$diff_ids" > config.json
          config_sum=$(sha256sum config.json | cut -d' ' -f1)
          mv config.json img/$config_sum.json
          printf '[{"Config":"%s.json","RepoTags":["hello-api:latest"],"Layers":[%s]}]' "$config_sum" "$layer_paths" > img/manifest.json

          if [ -n "''${unpacked:-}" ]; then
            echo "keeping the image unpacked"
            mv img $out
          else
            echo "writing docker-archive"
            tar $tarflags -C img -cf - . | gzip -9n > $out
          fi
        '' ];
      };
      # The same image, unpacked in the store, and a script that writes its
      # docker-archive to stdout when run: the shape of
      # dockerTools.streamLayeredImage, whose archive never exists as a file.
      layers = derivation (image.drvAttrs // { name = "hello-api-layers"; unpacked = "1"; });
      stream = derivation {
        name = "stream-hello-api";
        inherit system;
        builder = "/bin/sh";
        args = [ "-c" ''
          printf '#!/bin/sh\nexec /usr/bin/tar --sort=name --mtime=@1 --owner=0 --group=0 --numeric-owner -C %s -cf - .\n' ${layers} > $out
          /bin/chmod 0755 $out
        '' ];
      };
    in {
      packages.${system} = {
        oci-image = image;
        oci-stream = stream;
        default = image;
      };
    };
}
