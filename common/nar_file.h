// NarFileWriter: a NAR compressed with zstd into a new file, as a farm
// store keeps it (STATE/nar/FILEHASH.nar.zst, or the same name in a
// bucket). Used by the coordinator for what it receives and by workers for
// what they upload straight to object storage.
//
// Not thread-safe.
#pragma once

#include <zstd.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/digest.h"

namespace kiln {

inline constexpr char kCompressedNarSuffix[] = ".nar.zst";

struct CompressedNar {
  std::string file;       // Where it is; the caller renames or removes it.
  std::string name;       // FILEHASH.nar.zst (FILEHASH in Nix's base32).
  std::string file_hash;  // sha256:BASE32 of the compressed bytes.
  uint64_t file_size = 0;
  std::string nar_hash;  // sha256:BASE32 of the NAR.
  uint64_t nar_size = 0;
};

class NarFileWriter {
 public:
  // A new file `dir`/.upload-XXXXXX.
  static absl::StatusOr<std::unique_ptr<NarFileWriter>> Create(const std::string& dir);
  // Removes the file unless Finish succeeded.
  ~NarFileWriter();
  NarFileWriter(const NarFileWriter&) = delete;
  NarFileWriter& operator=(const NarFileWriter&) = delete;

  // The NAR's next bytes.
  absl::Status Write(absl::string_view nar_bytes);
  // Ends the frame; fsyncs the file when `sync`. The file is the caller's.
  absl::StatusOr<CompressedNar> Finish(bool sync);

 private:
  NarFileWriter(int fd, std::string path);
  absl::Status Compress(absl::string_view in, ZSTD_EndDirective mode);

  int fd_;
  std::string path_;
  bool kept_ = false;
  struct ZstdFree {
    void operator()(ZSTD_CCtx* c) const { ZSTD_freeCCtx(c); }
  };
  std::unique_ptr<ZSTD_CCtx, ZstdFree> zstd_;
  std::vector<char> out_;
  Sha256 file_sha_, nar_sha_;
  uint64_t file_size_ = 0, nar_size_ = 0;
};

}  // namespace kiln
