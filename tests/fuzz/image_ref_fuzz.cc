// Fuzz target: image references and push patterns (common/image_ref.h).
// Input: a pattern on the first line, a reference after it (or a reference
// alone). Invariants, checked with abort():
//   - an accepted reference is its own canonical form, and that form parses
//     to the same fields;
//   - every component of an accepted reference is non-empty and neither
//     "." nor "..", so no registry can normalise it into another name;
//   - a pattern matches a reference exactly when its parts match the
//     reference's, as computed here another way: glob matching of the whole
//     path with FNM_PATHNAME (a glob never crosses '/'), the subtree form
//     `prefix/*` as the prefix plus at least one more component.
#include <fnmatch.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/image_ref.h"

namespace {

void Check(bool ok) {
  if (!ok) std::abort();
}

bool PathGlob(const std::string& pattern, const std::string& subject) {
  return ::fnmatch(pattern.c_str(), subject.c_str(), FNM_PATHNAME) == 0;
}

// The pattern's verdict, computed on the texts rather than on the parsed parts.
bool MatchesByText(const kiln::ImagePattern& p, const kiln::ImageRef& ref) {
  if (!PathGlob(p.registry, ref.registry)) return false;
  if (!p.tag.empty() && (ref.tag.empty() || !PathGlob(p.tag, ref.tag))) return false;
  if (p.components.back() != "*") return PathGlob(absl::StrJoin(p.components, "/"), ref.repository);
  const std::vector<std::string> prefix(p.components.begin(), p.components.end() - 1);
  const std::vector<std::string> parts = absl::StrSplit(ref.repository, '/');
  if (parts.size() <= prefix.size()) return false;
  if (prefix.empty()) return true;
  const std::vector<std::string> head(parts.begin(), parts.begin() + static_cast<long>(prefix.size()));
  return PathGlob(absl::StrJoin(prefix, "/"), absl::StrJoin(head, "/"));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  const size_t newline = text.find('\n');
  const std::string ref_text = newline == std::string::npos ? text : text.substr(newline + 1);
  auto ref = kiln::ParseImageRef(ref_text);
  if (ref.ok()) {
    Check(ref->ToString() == ref_text);
    auto again = kiln::ParseImageRef(ref->ToString());
    Check(again.ok() && again->registry == ref->registry && again->repository == ref->repository &&
          again->tag == ref->tag && again->digest == ref->digest);
    for (const std::string& c : ref->Components()) Check(!c.empty() && c != "." && c != "..");
  }
  if (newline == std::string::npos) return 0;
  auto pattern = kiln::ParseImagePattern(text.substr(0, newline));
  if (!pattern.ok()) return 0;
  Check(!pattern->components.empty());
  if (ref.ok()) Check(pattern->Matches(*ref) == MatchesByText(*pattern, *ref));
  return 0;
}
