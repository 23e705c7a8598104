// Fuzz target: a source tree as the coordinator and workers receive it.
// The input is cut into blobs at each "\n--\n"; the first is the root
// directory. Every blob goes through the directory parser, the tree through
// the walks that check names, links and limits.
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "common/source_tree.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  std::vector<std::string> blobs = absl::StrSplit(text, "\n--\n");
  std::map<std::string, std::string> by_hash;
  for (const std::string& blob : blobs) {
    by_hash[kiln::DigestOf(blob).hash()] = blob;
    (void)kiln::ParseCanonicalDirectory(blob);
  }
  kiln::SourceTreeLimits limits;
  limits.max_depth = 16;
  limits.max_entries = 4096;
  const kiln::BlobLookup lookup = [&](const std::string& hash) -> const std::string* {
    auto it = by_hash.find(hash);
    return it == by_hash.end() ? nullptr : &it->second;
  };
  const kiln::v1::Digest root = kiln::DigestOf(blobs.front());
  (void)kiln::ListTreeBlobs(root, lookup, limits);
  (void)kiln::CollectTreeDirectories(root, lookup, limits);
  (void)kiln::FindSubtree(root, "a/b", lookup);
  (void)kiln::LinkEscape(blobs.back());
  return 0;
}
