#include "worker/nix_system_info.h"

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/subprocess.h"

namespace kiln {

NixSystemInfo ParseNixShowConfig(absl::string_view text) {
  NixSystemInfo info;
  std::vector<std::string> extra;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    auto eq = line.find(" = ");
    if (eq == absl::string_view::npos) continue;
    absl::string_view name = absl::StripAsciiWhitespace(line.substr(0, eq));
    absl::string_view value = absl::StripAsciiWhitespace(line.substr(eq + 3));
    std::vector<std::string> words = absl::StrSplit(value, ' ', absl::SkipEmpty());
    if (name == "system") {
      info.systems.insert(info.systems.begin(), words.begin(), words.end());
    } else if (name == "extra-platforms") {
      extra = words;
    } else if (name == "system-features") {
      info.features = words;
    }
  }
  for (auto& s : extra) {
    if (std::find(info.systems.begin(), info.systems.end(), s) == info.systems.end()) info.systems.push_back(s);
  }
  return info;
}

absl::StatusOr<NixSystemInfo> QueryNixSystemInfo(const std::string& nix_binary) {
  ProcessSpec spec;
  spec.argv = {nix_binary, "--extra-experimental-features", "nix-command flakes", "show-config"};
  absl::StatusOr<CommandResult> result = RunCommand(spec, "", absl::Seconds(60));
  if (!result.ok()) return result.status();
  if (!result->exit.Success()) {
    return absl::FailedPreconditionError(
        absl::StrCat("nix show-config failed (", result->exit.ToString(), "): ", result->stderr_data));
  }
  NixSystemInfo info = ParseNixShowConfig(result->stdout_data);
  if (info.systems.empty()) return absl::FailedPreconditionError("nix show-config names no system");
  return info;
}

}  // namespace kiln
