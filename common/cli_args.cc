#include "common/cli_args.h"

#include <sys/stat.h>

#include <algorithm>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_format.h"
#include "common/source_tree.h"
#include "common/status_macros.h"

namespace kiln {

std::vector<std::string> RespellOptionNames(int argc, char** argv, char from, char to) {
  std::vector<std::string> out;
  bool rest_positional = false;
  for (int i = 0; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--") rest_positional = true;
    if (!rest_positional && i > 0 && arg.size() > 2 && arg[0] == '-' && arg[1] == '-') {
      const size_t end = arg.find('=');
      for (size_t j = 2; j < arg.size() && j < end; ++j) {
        if (arg[j] == from) arg[j] = to;
      }
    }
    out.push_back(std::move(arg));
  }
  return out;
}

DashedFlagArgs::DashedFlagArgs(int argc, char** argv) : storage_(RespellOptionNames(argc, argv, '-', '_')) {
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

namespace {

// C0 controls and DEL: what a terminal acts on rather than shows.
bool IsControlChar(char c) {
  const auto u = static_cast<unsigned char>(c);
  return u < 0x20 || u == 0x7f;
}

}  // namespace

std::string TerminalSafe(absl::string_view text, bool multiline) {
  std::string out;
  out.reserve(text.size());
  for (char c : text) {
    if (IsControlChar(c) && !(multiline && (c == '\n' || c == '\t'))) {
      absl::StrAppendFormat(&out, "\\x%02x", static_cast<unsigned char>(c));
    } else {
      out.push_back(c);
    }
  }
  return out;
}

absl::Status CheckPrintableName(absl::string_view what, absl::string_view value, size_t max_bytes) {
  if (value.size() > max_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " is ", value.size(), " bytes long; at most ", max_bytes, " are allowed"));
  }
  if (std::any_of(value.begin(), value.end(), IsControlChar)) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " '", TerminalSafe(value, false), "' has a control character; names are printable text"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadPrivateTokenFile(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return absl::NotFoundError(absl::StrCat("no token file ", path));
  if ((st.st_mode & 077) != 0) {
    return absl::PermissionDeniedError(absl::StrCat(path, " may be read by others (mode ",
                                                    absl::StrFormat("%04o", st.st_mode & 07777),
                                                    "): a token file must be private; chmod 600 ", path));
  }
  std::string text;
  RETURN_IF_ERROR(ReadWholeFile(path, text));
  return std::string(absl::StripAsciiWhitespace(text));
}

absl::StatusOr<std::map<std::string, std::string>> ParseLabels(const std::vector<std::string>& items) {
  std::map<std::string, std::string> labels;
  for (const std::string& item : items) {
    const size_t eq = item.find('=');
    if (eq == std::string::npos || eq == 0) {
      return absl::InvalidArgumentError(absl::StrCat("a label is KEY=VALUE, got '", TerminalSafe(item, false), "'"));
    }
    const std::string key = item.substr(0, eq), value = item.substr(eq + 1);
    RETURN_IF_ERROR(CheckPrintableName("label key", key, 128));
    RETURN_IF_ERROR(CheckPrintableName(absl::StrCat("label '", key, "' value"), value, 256));
    if (!labels.emplace(key, value).second) {
      return absl::InvalidArgumentError(absl::StrCat("label '", key, "' is given twice; a label has one value"));
    }
  }
  return labels;
}

}  // namespace kiln
