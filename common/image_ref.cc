#include "common/image_ref.h"

#include <fnmatch.h>

#include "absl/algorithm/container.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/status_macros.h"

namespace kiln {
namespace {

constexpr size_t kMaxNameLength = 255;  // registry/repository, as registries bound it
constexpr size_t kMaxTagLength = 128;

constexpr absl::string_view kComponentRule =
    "a repository is components joined by single '/', each of lower-case letters and digits separated by "
    "single '.', '_', '__' or dashes (e.g. team/app-api)";

bool IsLowerAlnum(char c) { return absl::ascii_islower(c) || absl::ascii_isdigit(c); }

// [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*
bool IsPathComponent(absl::string_view c) {
  size_t i = 0;
  for (;;) {
    const size_t run = i;
    while (i < c.size() && IsLowerAlnum(c[i])) ++i;
    if (i == run) return false;  // A separator must be followed by letters or digits.
    if (i == c.size()) return true;
    if (c[i] == '.') {
      ++i;
    } else if (c[i] == '_') {
      ++i;
      if (i < c.size() && c[i] == '_') ++i;
    } else if (c[i] == '-') {
      while (i < c.size() && c[i] == '-') ++i;
    } else {
      return false;
    }
  }
}

// [a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]
bool IsDomainComponent(absl::string_view c) {
  if (c.empty() || !absl::ascii_isalnum(c.front()) || !absl::ascii_isalnum(c.back())) return false;
  for (char ch : c) {
    if (!absl::ascii_isalnum(ch) && ch != '-') return false;
  }
  return true;
}

// host[:port]: domain components joined by '.', or an IPv6 literal in
// brackets; a port of 1–5 digits.
bool IsRegistry(absl::string_view r) {
  absl::string_view host = r;
  if (const size_t colon = r.rfind(':');
      colon != absl::string_view::npos && r.find(']', colon) == absl::string_view::npos) {
    const absl::string_view port = r.substr(colon + 1);
    if (port.empty() || port.size() > 5 || !absl::c_all_of(port, absl::ascii_isdigit)) return false;
    host = r.substr(0, colon);
  }
  if (absl::StartsWith(host, "[")) {
    if (host.size() < 3 || host.back() != ']') return false;
    return absl::c_all_of(host.substr(1, host.size() - 2),
                          [](char c) { return absl::ascii_isxdigit(c) || c == ':' || c == '.'; });
  }
  for (absl::string_view part : absl::StrSplit(host, '.')) {
    if (!IsDomainComponent(part)) return false;
  }
  return true;
}

bool IsDigest(absl::string_view d) {
  const size_t colon = d.find(':');
  if (colon == absl::string_view::npos) return false;
  const absl::string_view algo = d.substr(0, colon);
  const absl::string_view hex = d.substr(colon + 1);
  const size_t want = algo == "sha256" ? 64 : algo == "sha512" ? 128 : 0;
  return want != 0 && hex.size() == want &&
         absl::c_all_of(hex, [](char c) { return absl::ascii_isdigit(c) || (c >= 'a' && c <= 'f'); });
}

absl::Status Refuse(absl::string_view text, absl::string_view why) {
  return absl::InvalidArgumentError(absl::StrCat("'", absl::CHexEscape(text.substr(0, 300)), "': ", why));
}

// Glob characters allowed in a pattern part besides the part's own.
bool IsGlobChar(char c) { return c == '*' || c == '?' || c == '[' || c == ']' || c == '!'; }

bool Glob(const std::string& pattern, const std::string& subject) {
  return ::fnmatch(pattern.c_str(), subject.c_str(), 0) == 0;
}

}  // namespace

std::vector<std::string> ImageRef::Components() const { return absl::StrSplit(repository, '/'); }

std::string ImageRef::ToString() const {
  return absl::StrCat(registry, "/", repository, tag.empty() ? "" : ":", tag, digest.empty() ? "" : "@", digest);
}

absl::Status ValidateImageTag(absl::string_view tag) {
  const bool ok =
      !tag.empty() && tag.size() <= kMaxTagLength && (absl::ascii_isalnum(tag[0]) || tag[0] == '_') &&
      absl::c_all_of(tag, [](char c) { return absl::ascii_isalnum(c) || c == '_' || c == '.' || c == '-'; });
  if (ok) return absl::OkStatus();
  return Refuse(tag,
                "not a tag: a tag starts with a letter, digit or '_' and goes on with letters, digits, '.', "
                "'_' or '-', at most 128 characters");
}

absl::StatusOr<ImageRef> ParseImageRef(absl::string_view text) {
  const size_t slash = text.find('/');
  if (slash == absl::string_view::npos || slash == 0) {
    return Refuse(text, "does not name a registry (host[:port]/repository[:tag])");
  }
  ImageRef ref;
  ref.registry = std::string(text.substr(0, slash));
  if (!IsRegistry(ref.registry)) {
    return Refuse(text, absl::StrCat("'", absl::CHexEscape(ref.registry),
                                     "' is not a registry host[:port] (letters, digits, '-' and '.', or [IPv6])"));
  }
  absl::string_view rest = text.substr(slash + 1);
  if (const size_t at = rest.find('@'); at != absl::string_view::npos) {
    ref.digest = std::string(rest.substr(at + 1));
    if (!IsDigest(ref.digest)) {
      return Refuse(text, absl::StrCat("'", absl::CHexEscape(ref.digest),
                                       "' is not a digest (sha256:<64 hex digits> or sha512:<128>)"));
    }
    rest = rest.substr(0, at);
  }
  // The repository has no ':' (the port is in the registry part).
  if (const size_t colon = rest.rfind(':'); colon != absl::string_view::npos) {
    ref.tag = std::string(rest.substr(colon + 1));
    if (absl::Status s = ValidateImageTag(ref.tag); !s.ok()) {
      return Refuse(text, absl::StrCat("tag ", s.message()));
    }
    rest = rest.substr(0, colon);
  }
  if (rest.empty()) return Refuse(text, absl::StrCat("no repository: ", kComponentRule));
  for (absl::string_view component : absl::StrSplit(rest, '/')) {
    if (component.empty()) {
      return Refuse(text, absl::StrCat("an empty path component ('/' at an end or two in a row): ", kComponentRule));
    }
    if (!IsPathComponent(component)) {
      return Refuse(
          text, absl::StrCat("path component '", absl::CHexEscape(component), "' is not allowed: ", kComponentRule));
    }
  }
  ref.repository = std::string(rest);
  if (ref.registry.size() + 1 + ref.repository.size() > kMaxNameLength) {
    return Refuse(text, absl::StrCat("the name is longer than ", kMaxNameLength, " characters"));
  }
  return ref;
}

absl::StatusOr<ImageRef> ParsePushReference(absl::string_view text, const std::vector<std::string>& more_tags,
                                            std::vector<std::string>* tags) {
  absl::StatusOr<ImageRef> ref = ParseImageRef(text);
  if (!ref.ok()) return ref;
  if (!ref->digest.empty()) return Refuse(text, "push to a tag, not a digest");
  tags->clear();
  if (!ref->tag.empty()) tags->push_back(ref->tag);
  for (const std::string& tag : more_tags) {
    RETURN_IF_ERROR(ValidateImageTag(tag));
    tags->push_back(tag);
  }
  return ref;
}

absl::StatusOr<ImageRef> ParsePushRepository(absl::string_view repository) {
  absl::StatusOr<ImageRef> ref = ParseImageRef(repository);
  if (!ref.ok()) return ref;
  if (!ref->tag.empty() || !ref->digest.empty()) return Refuse(repository, "give tags separately");
  return ref;
}

absl::StatusOr<ImagePattern> ParseImagePattern(absl::string_view text) {
  const auto refuse = [&](absl::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat("push pattern '", absl::CHexEscape(text.substr(0, 300)), "': ", why,
                     " (REGISTRY/REPOSITORY[:TAG], globs within a part, e.g. rg.fr-par.scw.cloud/team/*:testing)"));
  };
  const size_t slash = text.find('/');
  if (slash == absl::string_view::npos || slash == 0) return refuse("names no registry");
  ImagePattern pattern;
  pattern.registry = std::string(text.substr(0, slash));
  for (char c : pattern.registry) {
    if (!absl::ascii_isalnum(c) && c != '.' && c != '-' && c != ':' && !IsGlobChar(c)) {
      return refuse("the registry part has a character no registry has");
    }
  }
  absl::string_view rest = text.substr(slash + 1);
  if (const size_t colon = rest.rfind(':'); colon != absl::string_view::npos) {
    pattern.tag = std::string(rest.substr(colon + 1));
    if (pattern.tag.empty()) return refuse("an empty tag part");
    for (char c : pattern.tag) {
      if (!absl::ascii_isalnum(c) && c != '.' && c != '_' && c != '-' && !IsGlobChar(c)) {
        return refuse("the tag part has a character no tag has");
      }
    }
    rest = rest.substr(0, colon);
  }
  for (absl::string_view component : absl::StrSplit(rest, '/')) {
    if (component.empty()) return refuse("an empty repository component");
    for (char c : component) {
      if (!IsLowerAlnum(c) && c != '.' && c != '_' && c != '-' && !IsGlobChar(c)) {
        return refuse("a repository component has a character no repository has");
      }
    }
    pattern.components.emplace_back(component);
  }
  return pattern;
}

bool ImagePattern::Matches(const ImageRef& ref) const {
  if (!Glob(registry, ref.registry)) return false;
  if (!tag.empty() && (ref.tag.empty() || !Glob(tag, ref.tag))) return false;
  if (components.empty()) return false;
  const std::vector<std::string> parts = ref.Components();
  const bool subtree = components.back() == "*";
  if (subtree ? parts.size() < components.size() : parts.size() != components.size()) return false;
  for (size_t i = 0; i < components.size(); ++i) {
    if (subtree && i + 1 == components.size()) return true;  // One or more components, any.
    if (!Glob(components[i], parts[i])) return false;
  }
  return true;
}

bool PushPatternMatches(const std::string& pattern, const std::string& repository, const std::string& tag) {
  // On the parsed components only: a reference that does not parse (say,
  // with a '..' component a registry would normalise away) matches nothing.
  absl::StatusOr<ImagePattern> parsed_pattern = ParseImagePattern(pattern);
  absl::StatusOr<ImageRef> ref = ParseImageRef(absl::StrCat(repository, ":", tag));
  return parsed_pattern.ok() && ref.ok() && ref->digest.empty() && parsed_pattern->Matches(*ref);
}

}  // namespace kiln
