#include "common/nix_store_validity.h"

#include <algorithm>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "common/subprocess.h"

namespace kiln {

std::string NixStoreBinaryBeside(const std::string& nix_binary) {
  const size_t slash = nix_binary.rfind('/');
  if (slash == std::string::npos) return "nix-store";
  return absl::StrCat(nix_binary.substr(0, slash + 1), "nix-store");
}

absl::StatusOr<absl::flat_hash_set<std::string>> ValidPathsFromInvalidList(const std::vector<std::string>& asked,
                                                                           absl::string_view printed) {
  absl::flat_hash_set<std::string> valid(asked.begin(), asked.end());
  for (absl::string_view line : absl::StrSplit(printed, '\n', absl::SkipWhitespace())) {
    line = absl::StripAsciiWhitespace(line);
    auto it = valid.find(line);
    if (it != valid.end()) {
      valid.erase(it);
    } else if (std::find(asked.begin(), asked.end(), line) == asked.end()) {
      return absl::InternalError(
          absl::StrCat("nix-store --check-validity named a path it was not asked about: '", line.substr(0, 200), "'"));
    }
  }
  return valid;
}

absl::StatusOr<absl::flat_hash_set<std::string>> QueryValidPaths(
    const std::string& nix_store_binary, const std::vector<std::pair<std::string, std::string>>& options,
    const std::vector<std::string>& paths) {
  if (paths.empty()) return absl::flat_hash_set<std::string>();
  ProcessSpec spec;
  spec.argv = {nix_store_binary};
  for (const auto& [name, value] : options) spec.argv.insert(spec.argv.end(), {"--option", name, value});
  // Store paths begin with "/": none can be read as an option.
  spec.argv.insert(spec.argv.end(), {"--check-validity", "--print-invalid"});
  spec.argv.insert(spec.argv.end(), paths.begin(), paths.end());
  absl::StatusOr<CommandResult> ran = RunCommand(spec, "", absl::Minutes(2), 16 << 20);
  if (!ran.ok()) {
    return absl::Status(ran.status().code(),
                        absl::StrCat("cannot ask Nix which outputs are valid: ", ran.status().message()));
  }
  if (!ran->exit.Success()) {
    std::string why(absl::StripAsciiWhitespace(ran->stderr_data.substr(0, 2000)));
    return absl::FailedPreconditionError(
        absl::StrCat("nix-store --check-validity failed (", ran->exit.ToString(), "): ", why));
  }
  return ValidPathsFromInvalidList(paths, ran->stdout_data);
}

}  // namespace kiln
