// ImagePusher: a docker-archive to a registry, as Docker v2 schema 2.
//
// Layers leave gzip-compressed (LayerGzip: no timestamp in the header, so
// the same layer always compresses to the same bytes and digest), their
// digest and size computed as they are compressed. A LayerCache
// remembers each layer's compressed digest by its uncompressed one
// (diff_id): an unchanged layer of a later push costs one HEAD, not a
// recompression. Every blob the registry already has is skipped.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "push/layer_gzip.h"
#include "push/registry_client.h"

namespace kiln {

// diff_id -> compressed digest and size, kept in a JSON file. Thread-safe.
class LayerCache {
 public:
  struct Entry {
    std::string digest;
    uint64_t size = 0;
    std::string seen_in;  // registry/repository that last had it: a mount source.
  };
  // `path` empty: in memory only.
  explicit LayerCache(std::string path);
  bool Find(const std::string& diff_id, int level, Entry* entry) const ABSL_LOCKS_EXCLUDED(mu_);
  // Where a compressed blob was last seen ("" when never): for a stream,
  // whose layers' diff_ids are known only after they are compressed.
  std::string SeenIn(const std::string& digest) const ABSL_LOCKS_EXCLUDED(mu_);
  void Put(const std::string& diff_id, int level, Entry entry) ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status Save() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  const std::string path_;
  mutable absl::Mutex mu_;
  std::map<std::string, Entry> entries_ ABSL_GUARDED_BY(mu_);  // "level:diff_id"
};

struct PushOptions {
  int gzip_level = kDefaultGzipLevel;
  std::string scratch_dir = "/tmp";
  LayerCache* cache = nullptr;  // Optional.
  bool oci_manifest = false;    // Default: Docker v2 schema 2, as skopeo pushes.
  // Threads compressing, and threads uploading. Above 1, the archive is
  // read in one sequential pass, a pool of `parallel` threads compresses
  // each layer's gzip members as it is read, and `parallel` threads send
  // the compressed layers (held in memory, large ones in scratch files),
  // each through a client of its own from `make_client`. PushImageStream
  // uses the pool alone.
  int parallel = 1;
  std::function<std::unique_ptr<RegistryClient>()> make_client;
  // PushImageStream: compressed bytes of a layer held in memory before it
  // is streamed to the registry instead.
  size_t stream_hold_bytes = 8 << 20;
  // Called (from any pushing thread, one call at a time) after each layer is
  // in the registry: layers done so far, compressed bytes uploaded so far.
  std::function<void(size_t layers_done, uint64_t bytes_uploaded)> on_layer;
};

struct PushedBlob {
  std::string digest;
  uint64_t size = 0;
  bool skipped = false;  // The registry had it (or mounted it).
  bool mounted = false;  // Linked from another repository of the registry.
};

struct PushReport {
  std::string manifest_digest;
  uint64_t manifest_size = 0;
  PushedBlob config;
  std::vector<PushedBlob> layers;
  std::vector<std::string> tags;
  uint64_t bytes_uploaded = 0;
};

// Pushes the docker-archive at `archive` to `ref.repository` under each of
// `tags` (ref.tag when empty).
absl::StatusOr<PushReport> PushDockerArchive(const std::string& archive, const ImageRef& ref,
                                             std::vector<std::string> tags, RegistryClient& client,
                                             const PushOptions& options);

// Pushes a docker-archive read once from `fd` (a pipe): each layer is
// compressed as it arrives and a layer larger than stream_hold_bytes compressed is
// streamed to the registry in chunks while it is read (nothing on disk);
// smaller ones are checked with HEAD first (and mounted from another
// repository when the cache has seen them there). `what` names the source in
// errors.
absl::StatusOr<PushReport> PushImageStream(int fd, const std::string& what, const ImageRef& ref,
                                           std::vector<std::string> tags, RegistryClient& client,
                                           const PushOptions& options);

// What a build produced: a docker-archive file, or an executable that
// writes one to stdout (`dockerTools.streamLayeredImage`), which is run and
// its output pushed as it comes.
absl::StatusOr<PushReport> PushImage(const std::string& output, const ImageRef& ref, std::vector<std::string> tags,
                                     RegistryClient& client, const PushOptions& options);

}  // namespace kiln
