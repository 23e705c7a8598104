#include "common/nix_log.h"

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/json_fields.h"

namespace kiln {
namespace {

// Activity and result type numbers of Nix's internal-json logger
// (stable since Nix 2.0).
constexpr int kActivityBuild = 105;
constexpr int kResultBuildLogLine = 101;
constexpr absl::string_view kPrefix = "@nix ";

}  // namespace

std::string OneLineNixError(absl::string_view message, size_t max_chars) {
  const std::string plain = StripAnsi(message);
  std::string first;
  size_t more = 0;
  for (absl::string_view line : absl::StrSplit(plain, '\n')) {
    const bool starts_error = absl::StartsWith(absl::StripLeadingAsciiWhitespace(line), "error:");
    line = absl::StripAsciiWhitespace(line);
    if (line.empty()) continue;
    if (!first.empty()) {
      if (starts_error) ++more;
      continue;
    }
    while (absl::ConsumePrefix(&line, "error:")) line = absl::StripLeadingAsciiWhitespace(line);
    absl::ConsumeSuffix(&line, ";");
    first = std::string(line);
  }
  if (first.empty()) return "no error message";
  if (more > 0) absl::StrAppend(&first, " (and ", more, more == 1 ? " more error)" : " more errors)");
  if (first.size() > max_chars) first = absl::StrCat(first.substr(0, max_chars > 3 ? max_chars - 3 : 0), "...");
  return first;
}

std::string StripAnsi(absl::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] != '\x1b') {
      out.push_back(text[i]);
      continue;
    }
    // ESC [ params final-byte (CSI), or ESC + one character.
    if (i + 1 < text.size() && text[i + 1] == '[') {
      i += 2;
      while (i < text.size() && !(text[i] >= 0x40 && text[i] <= 0x7e)) ++i;
    } else {
      ++i;
    }
  }
  return out;
}

std::string DerivationShortName(absl::string_view drv_path) {
  absl::string_view name = drv_path;
  if (!absl::ConsumePrefix(&name, "/nix/store/")) return std::string(drv_path);
  auto dash = name.find('-');
  if (dash == absl::string_view::npos) return std::string(drv_path);
  name.remove_prefix(dash + 1);
  absl::ConsumeSuffix(&name, ".drv");
  return std::string(name);
}

std::optional<NixLogEvent> NixLogParser::ParseLine(absl::string_view line) {
  if (!absl::StartsWith(line, kPrefix)) {
    NixLogEvent event;
    event.kind = NixLogEvent::Kind::kMessage;
    event.text = StripAnsi(line);
    if (absl::StartsWith(event.text, "error:")) {
      event.level = 0;
      errors_.push_back(event.text);
    }
    return event;
  }
  nlohmann::json j = nlohmann::json::parse(line.substr(kPrefix.size()), nullptr,
                                           /*allow_exceptions=*/false);
  if (!j.is_object()) {
    NixLogEvent event;
    event.text = std::string(line);
    return event;
  }
  const std::string action = JsonString(j, "action");
  if (action == "msg") {
    int level = JsonInt<int>(j, "level", 3);
    if (level > max_level_) return std::nullopt;
    NixLogEvent event;
    event.kind = NixLogEvent::Kind::kMessage;
    event.level = level;
    event.text = StripAnsi(JsonString(j, "msg"));
    if (level == 0) errors_.push_back(event.text);
    return event;
  }
  if (action == "start") {
    uint64_t id = JsonInt<uint64_t>(j, "id", 0);
    int type = JsonInt<int>(j, "type", 0);
    if (type == kActivityBuild && j.contains("fields") && j["fields"].is_array() && !j["fields"].empty() &&
        j["fields"][0].is_string()) {
      const std::string drv = j["fields"][0].get<std::string>();
      activity_derivation_[id] = DerivationShortName(drv);
      build_index_[id] = builds_.size();
      builds_.push_back(NixBuildActivity{drv, absl::Now()});
    }
    int level = JsonInt<int>(j, "level", 3);
    std::string text = StripAnsi(JsonString(j, "text"));
    if (level > max_level_ || text.empty()) return std::nullopt;
    NixLogEvent event;
    event.kind = NixLogEvent::Kind::kActivity;
    event.level = level;
    event.text = std::move(text);
    return event;
  }
  if (action == "result" && JsonInt<int>(j, "type", 0) == kResultBuildLogLine) {
    const nlohmann::json fields = j.contains("fields") ? j["fields"] : nlohmann::json();
    if (!fields.is_array() || fields.empty() || !fields[0].is_string()) return std::nullopt;
    NixLogEvent event;
    event.kind = NixLogEvent::Kind::kBuildOutput;
    auto it = activity_derivation_.find(JsonInt<uint64_t>(j, "id", 0));
    if (it != activity_derivation_.end()) event.derivation = it->second;
    event.text = StripAnsi(fields[0].get<std::string>());
    return event;
  }
  if (action == "stop") {
    const uint64_t id = JsonInt<uint64_t>(j, "id", 0);
    activity_derivation_.erase(id);
    if (auto it = build_index_.find(id); it != build_index_.end()) {
      NixBuildActivity& b = builds_[it->second];
      b.duration = absl::Now() - b.started;
      b.stopped = true;
      build_index_.erase(it);
    }
  }
  return std::nullopt;
}

absl::StatusOr<std::vector<NixBuiltPath>> ParseNixBuildJson(absl::string_view json) {
  nlohmann::json j = nlohmann::json::parse(json, nullptr, /*allow_exceptions=*/false);
  if (!j.is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat("nix build --json printed no JSON array: '", json.substr(0, 200), "'"));
  }
  std::vector<NixBuiltPath> out;
  for (const auto& item : j) {
    if (!item.is_object()) return absl::InvalidArgumentError("nix build --json: element is not an object");
    NixBuiltPath built;
    if (item.contains("drvPath") && item["drvPath"].is_string()) {
      built.drv_path = item["drvPath"].get<std::string>();
    }
    if (item.contains("outputs") && item["outputs"].is_object()) {
      for (const auto& [name, path] : item["outputs"].items()) {
        if (path.is_string()) built.outputs[name] = path.get<std::string>();
      }
    }
    out.push_back(std::move(built));
  }
  return out;
}

}  // namespace kiln
