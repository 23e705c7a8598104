// LayerGzip: a layer gzip-compressed as it is written, hashed as it goes
// out, to a file or a sink.
//
// libdeflate compresses about twice as fast as zlib at a like level and
// ratio, but only whole buffers: the layer becomes a series of gzip members
// of kMemberBytes of input each. RFC 1952 allows members one after another,
// and every gunzip (Go's, which registries' clients use, pigz, GNU gzip)
// reads them as one stream. libdeflate's header carries no name and mtime 0,
// so a layer always compresses to the same digest. At level "fast"
// (kFastGzip) ISA-L's igzip deflates the members instead, behind the same
// header.
//
// Members are independent, so a GzipMemberPool can compress several of one
// layer at once (as pigz does) and the writer emits them in order: a layer
// compresses to the same bytes on one thread or on many, and one large
// layer (a closure's biggest store path, a streamed image) gets every core.
//
// Input that does not compress (already-compressed files, random bytes:
// images carry plenty) is stored, not deflated: deflating it at level 6 runs
// at ~50 MB/s for nothing, storing it at memory speed. Each member is judged
// by samples across it, so the choice depends only on the bytes and the
// digest stays reproducible.
#pragma once

#include <cstdint>
#include <cstdio>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "common/digest.h"

struct libdeflate_compressor;

namespace kiln {

// The default level: the fastest whose layers came out no larger than
// skopeo's (Go's parallel gzip at its default level) on every corpus
// measured: shared libraries, Python sources, documentation, C headers
// (docs/BENCHMARKS.md). Level 6 makes them 1-4% smaller at ~1.4x the CPU.
inline constexpr int kDefaultGzipLevel = 4;

// "fast": ISA-L's igzip (its level 2) instead of libdeflate. It deflates
// 4-5x faster than level 4 for layers 2-11% larger (2-6% larger than
// skopeo's), for a registry close enough that the push is bound by CPU,
// not by the link. Its bytes are the same from run to run on one machine,
// but igzip picks SSE, AVX2 or AVX-512 code at run time and does not
// promise one output across them: workers of different CPUs may store a
// layer as two blobs.
inline constexpr int kFastGzip = 0;

// A --gzip-level value: "fast" (kFastGzip) or a level from 1 (fastest) to 9.
absl::StatusOr<int> ParseGzipLevel(absl::string_view text);
// How a level is written in flags and in the layer cache: "fast" or "1"…"9".
std::string GzipLevelName(int level);

// Compresses one member's input into a gzip member: deflated at the level
// given, or stored when samples of it do not shrink. Not thread-safe: one
// per thread.
class MemberCompressor {
 public:
  static constexpr size_t kMemberBytes = 1 << 20;
  MemberCompressor() = default;
  ~MemberCompressor();
  MemberCompressor(const MemberCompressor&) = delete;
  MemberCompressor& operator=(const MemberCompressor&) = delete;
  absl::Status Init(int level);
  // The member of `in` (at most kMemberBytes) into `out`, grown to
  // OutputBound() if smaller. Returns the member's size.
  absl::StatusOr<size_t> Compress(absl::string_view in, std::string& out);
  size_t OutputBound() const { return bound_; }

 private:
  bool Incompressible(absl::string_view in, std::string& scratch);
  // The deflated size of one sample starting at `in` (0: no room for it).
  size_t Sample(const char* in, std::string& scratch);
  size_t IgzipMember(absl::string_view in, std::string& out);
  libdeflate_compressor* compressor_ = nullptr;  // Null for kFastGzip.
  std::vector<unsigned char> igzip_buffer_;      // igzip's hash tables (kFastGzip).
  libdeflate_compressor* sampler_ = nullptr;
  size_t bound_ = 0;
};

// One member on its way through a pool: input in, output out.
struct GzipMember {
  std::string input;
  std::string output;  // The first output_size bytes are the member.
  size_t output_size = 0;
  absl::Status status;
  bool done = false;  // Guarded by the pool's mutex.
};

// Threads compressing members for any number of LayerGzip writers, first
// submitted first compressed.
class GzipMemberPool {
 public:
  GzipMemberPool(int level, int threads);
  ~GzipMemberPool();
  GzipMemberPool(const GzipMemberPool&) = delete;
  GzipMemberPool& operator=(const GzipMemberPool&) = delete;
  int threads() const { return static_cast<int>(threads_.size()); }
  void Submit(std::shared_ptr<GzipMember> member) ABSL_LOCKS_EXCLUDED(mu_);
  // Blocks until `member` is compressed; its output and status are then the
  // caller's to read.
  void Wait(const GzipMember& member) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  void Run(int level) ABSL_LOCKS_EXCLUDED(mu_);
  absl::Mutex mu_;
  std::deque<std::shared_ptr<GzipMember>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

struct CompressedLayer {
  std::string digest;  // "sha256:…" of the compressed bytes.
  uint64_t size = 0;
};

// Not thread-safe: one writer per layer.
class LayerGzip {
 public:
  static constexpr size_t kMemberBytes = MemberCompressor::kMemberBytes;
  using Sink = std::function<absl::Status(absl::string_view)>;
  LayerGzip() = default;
  ~LayerGzip();
  LayerGzip(const LayerGzip&) = delete;
  LayerGzip& operator=(const LayerGzip&) = delete;
  // `pool`: compress members there (it must outlive this writer); null:
  // on the writing thread.
  absl::Status Open(const std::string& path, int level, GzipMemberPool* pool = nullptr);
  absl::Status OpenSink(Sink sink, int level, GzipMemberPool* pool = nullptr);
  absl::Status Write(absl::string_view data);
  absl::StatusOr<CompressedLayer> Finish();

 private:
  absl::Status Init(int level, GzipMemberPool* pool);
  // Ends the member being filled: compressed here, or handed to the pool.
  absl::Status EndMember();
  // Waits for the oldest member in the pool and emits it.
  absl::Status EmitOldest();
  absl::Status Emit(absl::string_view piece);
  void Close();

  std::string path_;
  std::FILE* out_ = nullptr;
  Sink sink_;
  GzipMemberPool* pool_ = nullptr;
  MemberCompressor compressor_;  // Without a pool.
  std::string pending_;          // Input of the member being filled.
  std::string out_buf_;          // Without a pool.
  // With a pool: members handed over, oldest first, and buffers to reuse
  // (fresh megabytes cost a page fault per 4 KiB).
  std::deque<std::shared_ptr<GzipMember>> in_flight_;
  std::vector<std::shared_ptr<GzipMember>> spare_;
  size_t max_in_flight_ = 0;
  bool any_member_ = false;
  Sha256 hash_;
  uint64_t size_ = 0;
};

}  // namespace kiln
