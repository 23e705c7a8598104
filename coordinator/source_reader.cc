#include "coordinator/source_reader.h"

#include <algorithm>

#include "absl/container/node_hash_map.h"

namespace kiln {

SourceReader::SourceReader(StateStore* store, const BlobStore* cas, SourceReaderLimits limits)
    : store_(store), cas_(cas), limits_(limits) {}

absl::StatusOr<std::string> SourceReader::Read(const std::string& hash) const {
  return cas_ != nullptr ? cas_->ReadAll(hash) : store_->GetBlob(hash);
}

std::optional<kiln::v1::Digest> SourceReader::FlakeSubtree(const kiln::v1::SourceRef& source,
                                                           const BlobLookup& inline_blobs) const {
  // node_hash_map: the lookup hands out pointers that must survive inserts.
  absl::node_hash_map<std::string, std::string> read;
  const BlobLookup lookup = [&](const std::string& hash) -> const std::string* {
    if (const std::string* data = inline_blobs(hash)) return data;
    absl::StatusOr<std::string> blob = Read(hash);
    if (!blob.ok()) return nullptr;
    return &read.emplace(hash, *std::move(blob)).first->second;
  };
  // Absent or unreadable: no key (the worker will say there is no flake there).
  absl::StatusOr<kiln::v1::Digest> subtree = FindSubtree(source.tree_root(), source.flake_subdir(), lookup);
  if (!subtree.ok()) return std::nullopt;
  return *std::move(subtree);
}

absl::Status SourceReader::Attach(const kiln::v1::JobSpec& spec, kiln::v1::Assignment& assign) {
  const std::string& root = spec.source().tree_root().hash();
  auto cached = tree_blobs_.find(root);
  if (cached == tree_blobs_.end()) {
    absl::node_hash_map<std::string, std::string> fetched;
    absl::Status read_error;
    const BlobLookup lookup = [&](const std::string& hash) -> const std::string* {
      if (auto it = fetched.find(hash); it != fetched.end()) return &it->second;
      absl::StatusOr<std::string> blob = Read(hash);
      if (!blob.ok()) {
        if (!absl::IsNotFound(blob.status())) read_error = blob.status();
        return nullptr;
      }
      return &fetched.emplace(hash, *std::move(blob)).first->second;
    };
    // A large uploaded tree: its directories only; the worker fetches the
    // files its cache lacks from the CAS.
    absl::StatusOr<kiln::state::v1::BlobMeta> meta = cas_ != nullptr ? cas_->Meta(root) : absl::NotFoundError("no CAS");
    const bool directories_only =
        meta.ok() && meta->is_directory() && static_cast<uint64_t>(meta->tree_bytes()) > limits_.inline_source_bytes;
    absl::StatusOr<std::vector<std::string>> hashes;
    if (directories_only) {
      SourceTreeLimits limits;
      limits.max_total_bytes = limits_.max_tree_bytes;
      absl::StatusOr<std::vector<std::pair<std::string, std::string>>> dirs =
          CollectTreeDirectories(spec.source().tree_root(), lookup, limits);
      if (dirs.ok()) {
        hashes.emplace();
        for (const auto& [hash, _] : *dirs) hashes->push_back(hash);
      } else {
        hashes = dirs.status();
      }
    } else {
      hashes =
          ListTreeBlobs(spec.source().tree_root(), lookup,
                        {.max_total_bytes = std::max<uint64_t>(limits_.max_source_bytes, limits_.inline_source_bytes)});
    }
    if (!read_error.ok()) return read_error;
    if (!hashes.ok()) return hashes.status();
    auto blobs = std::make_shared<std::vector<kiln::v1::Blob>>();
    size_t bytes = 0;
    for (const std::string& hash : *hashes) {
      std::string& data = fetched.at(hash);
      kiln::v1::Blob& blob = blobs->emplace_back();
      blob.mutable_digest()->set_hash(hash);
      blob.mutable_digest()->set_size_bytes(static_cast<int64_t>(data.size()));
      bytes += data.size();
      blob.set_data(std::move(data));
    }
    // The jobs of a buildset share a tree: keep the recent trees' blobs
    // rather than read and walk them again for every assignment. Bounded.
    if (tree_blobs_.size() >= kCachedTrees || tree_blob_bytes_ + bytes > kCachedTreeBytes) {
      tree_blobs_.clear();
      tree_blob_bytes_ = 0;
    }
    tree_blob_bytes_ += bytes;
    cached = tree_blobs_.emplace(root, std::move(blobs)).first;
  }
  for (const kiln::v1::Blob& blob : *cached->second) *assign.add_blobs() = blob;
  return absl::OkStatus();
}

}  // namespace kiln
