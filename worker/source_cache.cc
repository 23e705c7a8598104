#include "worker/source_cache.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <system_error>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/cas_client.h"
#include "common/log.h"
#include "common/net.h"
#include "common/source_tree.h"
#include "common/status_macros.h"

namespace kiln {

namespace fs = std::filesystem;

namespace {
constexpr absl::string_view kSourceCacheComponent = "worker";
}  // namespace

absl::Status SourceCache::CheckOut(const kiln::v1::Assignment& assignment, const std::string& dest) {
  absl::flat_hash_map<std::string, const std::string*> inline_blobs;
  for (const auto& blob : assignment.blobs()) inline_blobs.try_emplace(blob.digest().hash(), &blob.data());
  const fs::path cache = fs::path(work_dir_) / "cas";
  const auto cached_path = [&](const std::string& hash) { return cache / hash.substr(0, 2) / hash; };
  const auto inline_lookup = [&inline_blobs](const std::string& hash) -> const std::string* {
    auto it = inline_blobs.find(hash);
    return it == inline_blobs.end() ? nullptr : it->second;
  };
  // The coordinator checked the tree's limits; these only bound the walk.
  SourceTreeLimits limits;
  limits.max_total_bytes = uint64_t{1} << 40;
  limits.max_entries = uint64_t{1} << 24;
  // Only the flake's own directory: Nix copies no more of a path: flake.
  absl::StatusOr<kiln::v1::Digest> subtree =
      FindSubtree(assignment.spec().source().tree_root(), assignment.spec().source().flake_subdir(), inline_lookup);
  if (absl::IsNotFound(subtree.status())) return absl::OkStatus();  // Nothing there: "no flake.nix" follows.
  if (!subtree.ok()) return subtree.status();
  const kiln::v1::Digest root = *std::move(subtree);
  absl::StatusOr<std::vector<std::pair<std::string, std::string>>> dirs =
      CollectTreeDirectories(root, inline_lookup, limits);
  if (!dirs.ok()) return dirs.status();
  std::vector<kiln::v1::Digest> missing;
  absl::flat_hash_set<std::string> wanted;
  uint64_t needed = 0;  // The checkout's files, and the blobs the cache lacks.
  for (const auto& [hash, data] : *dirs) {
    kiln::v1::Directory dir;
    if (!dir.ParseFromString(data)) return absl::DataLossError("a source directory does not parse");
    for (const auto& file : dir.files()) {
      const std::string& h = file.digest().hash();
      needed += static_cast<uint64_t>(std::max<int64_t>(0, file.digest().size_bytes()));
      if (inline_blobs.contains(h) || !wanted.insert(h).second) continue;
      std::error_code ec;
      const auto size = fs::file_size(cached_path(h), ec);
      if (!ec && size == static_cast<uintmax_t>(file.digest().size_bytes())) continue;
      missing.push_back(file.digest());
      needed += static_cast<uint64_t>(std::max<int64_t>(0, file.digest().size_bytes()));
    }
  }
  // Known before a byte is written: a source that cannot fit fails at once,
  // saying so, and leaves the disk as it was for the next job.
  std::error_code space_ec;
  const fs::space_info space = fs::space(work_dir_, space_ec);
  const auto no_space = [&](uint64_t free_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("no space left on the worker's work directory (%d MiB free, %d MiB needed)", free_bytes >> 20,
                        (needed + (1 << 20) - 1) >> 20));
  };
  if (!space_ec && space.available < needed) return no_space(space.available);
  if (!missing.empty()) {
    uint64_t bytes = 0;
    absl::Status fetched = FetchBlobs(*cas_, missing, [&](const kiln::v1::Digest& d, std::string&& data) {
      // Verified by FetchBlobs; written under a temporary name and renamed,
      // so the cache never holds a partial blob.
      const fs::path path = cached_path(d.hash());
      std::error_code ec;
      fs::create_directories(path.parent_path(), ec);
      RETURN_IF_ERROR(WriteFileAtomically(path.string(), data));
      bytes += data.size();
      return absl::OkStatus();
    });
    if (absl::IsResourceExhausted(fetched)) return no_space(fs::space(work_dir_, space_ec).available);
    if (!fetched.ok()) return fetched;
    LogInfo(ForJob(assignment.job_id()), kSourceCacheComponent, "fetched ", missing.size(), " source blob(s), ", bytes,
            " bytes");
  }
  // MaterializeTree asks for one blob at a time and is done with it before
  // the next: a file read from the cache needs only one buffer.
  std::string buffer;
  absl::flat_hash_map<std::string, const std::string*> dir_blobs;
  for (const auto& [hash, data] : *dirs) dir_blobs.emplace(hash, &data);
  const BlobLookup lookup = [&](const std::string& hash) -> const std::string* {
    if (const std::string* data = inline_lookup(hash)) return data;
    if (auto it = dir_blobs.find(hash); it != dir_blobs.end()) return it->second;
    const fs::path path = cached_path(hash);
    if (!ReadWholeFile(path.string(), buffer).ok()) return nullptr;
    std::error_code ec;
    fs::last_write_time(path, fs::file_time_type::clock::now(), ec);  // Used: the cache keeps it longest.
    return &buffer;
  };
  absl::Status checked_out = MaterializeTree(root, lookup, dest, limits);
  Trim();
  if (!checked_out.ok() && absl::StrContains(checked_out.message(), std::strerror(ENOSPC))) {
    return no_space(fs::space(work_dir_, space_ec).available);
  }
  return checked_out;
}

void SourceCache::Trim() {
  struct Cached {
    fs::file_time_type used;
    uintmax_t size;
    fs::path path;
  };
  std::vector<Cached> files;
  uintmax_t total = 0;
  std::error_code ec;
  for (fs::recursive_directory_iterator it(fs::path(work_dir_) / "cas", ec), end; !ec && it != end; it.increment(ec)) {
    if (!it->is_regular_file(ec)) continue;
    Cached c{.used = it->last_write_time(ec), .size = it->file_size(ec), .path = it->path()};
    total += c.size;
    files.push_back(std::move(c));
  }
  if (total <= max_bytes_) return;
  std::sort(files.begin(), files.end(), [](const Cached& a, const Cached& b) { return a.used < b.used; });
  size_t removed = 0;
  for (const Cached& c : files) {
    if (total <= max_bytes_) break;
    if (fs::remove(c.path, ec)) {
      total -= c.size;
      ++removed;
    }
  }
  LogInfo(kSourceCacheComponent, "blob cache: removed ", removed, " least recently used blob(s); ", total,
          " bytes kept");
}

void SweepSourceCacheLeftovers(const std::string& work_dir) {
  // Left by a worker killed mid-write (or by one from before temporary files
  // were removed on failure): never read, and they may be what fills the disk.
  std::error_code ec;
  uint64_t removed = 0, bytes = 0;
  for (fs::recursive_directory_iterator it(fs::path(work_dir) / "cas", ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (!it->is_regular_file(ec) || !(IsAtomicWriteLeftover(name) || absl::EndsWith(name, ".tmp"))) continue;
    const uintmax_t size = it->file_size(ec);
    if (fs::remove(it->path(), ec)) {
      ++removed;
      bytes += ec ? 0 : size;
    }
  }
  if (removed > 0) {
    LogInfo(kSourceCacheComponent, "removed ", removed, " temporary file(s) left in the source cache, ", bytes,
            " bytes");
  }
}

}  // namespace kiln
