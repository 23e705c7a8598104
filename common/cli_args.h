// Abseil flags are named with underscores; Kiln's command-line contract (like
// Nix's) uses dashes: `--state-dir`, `--max-jobs`. DashedFlagArgs rewrites
// the name part of every `--flag-name[=value]` argument before parsing, and
// leaves everything after a bare `--` alone.
#pragma once

#include <string>
#include <vector>

namespace kiln {

class DashedFlagArgs {
 public:
  DashedFlagArgs(int argc, char** argv);
  int argc() const { return static_cast<int>(pointers_.size()) - 1; }
  char** argv() { return pointers_.data(); }

 private:
  std::vector<std::string> storage_;
  std::vector<char*> pointers_;
};

// Where the command-line tools keep their caches (file digests, layer
// digests): $KILN_CACHE_DIR, else $XDG_CACHE_HOME/kiln, else ~/.cache/kiln;
// empty when none of them is set.
std::string UserCacheDir();

}  // namespace kiln
