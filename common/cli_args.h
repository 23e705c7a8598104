// Abseil flags are named with underscores; Kiln's command-line contract (like
// Nix's) uses dashes: `--state-dir`, `--max-jobs`. DashedFlagArgs rewrites
// the name part of every `--flag-name[=value]` argument before parsing, and
// leaves everything after a bare `--` alone.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kiln {

// `argv` with `from` replaced by `to` in option names ("--a-b=c" to
// "--a_b=c" or back); values, positional arguments and everything after "--"
// stay as they are.
std::vector<std::string> RespellOptionNames(int argc, char** argv, char from, char to);

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

// `text` made safe to print to a terminal: control characters (ESC, which
// starts the sequences that move the cursor, recolour or retitle a
// terminal; CR, BS, BEL, ...) are shown as \xNN instead of acted on.
// Newlines and tabs stay when `multiline`. For names, ids and messages that
// came from elsewhere (the coordinator, another user's submission).
std::string TerminalSafe(absl::string_view text, bool multiline = true);

// A name that labels or identifies something (a label key or value, a job or
// buildset id): printable, at most `max_bytes`. `what` names it in the error.
absl::Status CheckPrintableName(absl::string_view what, absl::string_view value, size_t max_bytes = 256);

// A token (a client's or a worker's) from a file only its owner may read,
// white space trimmed. NotFound when there is no such file; PermissionDenied,
// naming the chmod, when others may read it.
absl::StatusOr<std::string> ReadPrivateTokenFile(const std::string& path);

// `--label` / `--labels` values, KEY=VALUE each: checked with
// CheckPrintableName, a key given twice refused.
absl::StatusOr<std::map<std::string, std::string>> ParseLabels(const std::vector<std::string>& items);

}  // namespace kiln
