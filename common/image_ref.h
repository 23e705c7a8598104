// Image references as pushes name them, "host[:port]/repository[:tag]" or
// "...@digest", parsed by the OCI distribution grammar and nothing looser,
// and the patterns (`--push-allow`, token push scopes) matched against them.
//
// The registry host is required: Kiln has no default registry. A reference
// that parses has one spelling (ToString), and it is the one sent to the
// registry: no component like ".." or an empty one that a registry or proxy
// would normalise into another repository than the one permissions were
// checked on.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kiln {

struct ImageRef {
  std::string registry;    // host[:port], e.g. rg.fr-par.scw.cloud or 127.0.0.1:5000
  std::string repository;  // components joined by '/', e.g. sanmarcsoft/svc
  std::string tag;         // empty when not given
  std::string digest;      // "sha256:<64 hex>", empty when not given
  std::vector<std::string> Components() const;
  // The canonical spelling: what was parsed, and parses to the same.
  std::string ToString() const;
};

absl::StatusOr<ImageRef> ParseImageRef(absl::string_view text);

// Checks one tag by the grammar: [A-Za-z0-9_][A-Za-z0-9._-]{0,127}.
absl::Status ValidateImageTag(absl::string_view tag);

// A push target as a user writes it: REGISTRY/REPOSITORY[:TAG] and more
// tags (`kiln build --push --tag`, `kiln push`). A digest is refused (a push
// names tags) and every tag is checked. `tags`: the written one first.
absl::StatusOr<ImageRef> ParsePushReference(absl::string_view text, const std::vector<std::string>& more_tags,
                                            std::vector<std::string>* tags);

// A push target's repository as a job carries it, its tags apart (each for
// ValidateImageTag): a tag or digest in it is refused. What the coordinator
// admits and the worker pushes to.
absl::StatusOr<ImageRef> ParsePushRepository(absl::string_view repository);

// "REGISTRY/REPOSITORY[:TAG]" where each part may hold shell globs (`*`,
// `?`, `[...]`) within it: `rg.example.eu/team/*:testing`. Globs never cross
// a '/': each repository component is matched on its own, except that a
// last component of exactly `*` stands for one or more components (the
// whole subtree under the prefix). Without a tag part, any tag matches.
struct ImagePattern {
  std::string registry;
  std::vector<std::string> components;
  std::string tag;  // empty: any tag
  bool Matches(const ImageRef& ref) const;
};

absl::StatusOr<ImagePattern> ParseImagePattern(absl::string_view text);

// Whether a push pattern (--push-allow, push:PATTERN scopes) covers
// REPOSITORY:TAG: a pattern with a tag part matches the tagged name, one
// without matches the repository (fnmatch globs).
bool PushPatternMatches(const std::string& pattern, const std::string& repository, const std::string& tag);

}  // namespace kiln
