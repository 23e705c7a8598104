{
  description = "greeter: a tiny service script (the trivial example)";

  outputs = { self }:
    let
      system = "x86_64-linux";
    in {
      packages.${system}.default = derivation {
        name = "greeter";
        inherit system;
        builder = "/bin/sh";
        args = [ "-c" ''
          echo "writing greeter"
          printf '#!/bin/sh\necho "hello from greeter"\n' > $out
          /bin/chmod +x $out
        '' ];
      };
    };
}
