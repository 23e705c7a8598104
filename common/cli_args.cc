#include "common/cli_args.h"

#include <cstdlib>

namespace kiln {

DashedFlagArgs::DashedFlagArgs(int argc, char** argv) {
  bool rest_positional = false;
  for (int i = 0; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--") rest_positional = true;
    if (!rest_positional && i > 0 && arg.size() > 2 && arg[0] == '-' && arg[1] == '-') {
      const size_t end = arg.find('=');
      for (size_t j = 2; j < arg.size() && j < end; ++j) {
        if (arg[j] == '-') arg[j] = '_';
      }
    }
    storage_.push_back(std::move(arg));
  }
  for (auto& s : storage_) pointers_.push_back(s.data());
  pointers_.push_back(nullptr);
}

std::string UserCacheDir() {
  if (const char* dir = std::getenv("KILN_CACHE_DIR"); dir != nullptr && *dir != '\0') return dir;
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg != nullptr && *xdg != '\0') {
    return std::string(xdg) + "/kiln";
  }
  if (const char* home = std::getenv("HOME"); home != nullptr && *home != '\0') {
    return std::string(home) + "/.cache/kiln";
  }
  return "";
}

}  // namespace kiln
