#include "push/credentials.h"

#include <nlohmann/json.hpp>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/json_fields.h"
#include "common/source_tree.h"

namespace kiln {

absl::StatusOr<RegistryCredentials> LoadDockerCredentials(const std::string& path, const std::string& registry) {
  std::string text;
  if (absl::Status s = ReadWholeFile(path, text); !s.ok()) {
    return absl::NotFoundError(absl::StrCat("cannot read the registry credentials file ", path));
  }
  nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
  if (!j.is_object()) return absl::InvalidArgumentError(absl::StrCat(path, " is not JSON"));
  RegistryCredentials creds;
  if (!j.contains("auths") || !j["auths"].is_object()) return creds;
  for (auto it = j["auths"].begin(); it != j["auths"].end(); ++it) {
    absl::string_view key = it.key();
    absl::ConsumePrefix(&key, "https://");
    absl::ConsumePrefix(&key, "http://");
    key = key.substr(0, key.find('/'));
    if (key != registry || !it.value().is_object()) continue;
    const nlohmann::json& entry = it.value();
    if (entry.contains("auth") && entry["auth"].is_string()) {
      std::string decoded;
      if (!absl::Base64Unescape(entry["auth"].get<std::string>(), &decoded) || decoded.find(':') == std::string::npos) {
        return absl::InvalidArgumentError(absl::StrCat(path, ": the entry for ", registry, " has a malformed auth"));
      }
      creds.username = decoded.substr(0, decoded.find(':'));
      creds.password = decoded.substr(decoded.find(':') + 1);
    } else {
      creds.username = JsonString(entry, "username");
      creds.password = JsonString(entry, "password");
    }
    return creds;
  }
  return creds;
}

}  // namespace kiln
