#include "common/nar_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "common/nix_hash.h"
#include "common/status_macros.h"

namespace kiln {
namespace {

// Fast enough to keep up with a network upload on one core, and most of
// zstd's ratio on text.
constexpr int kZstdLevel = 3;

absl::Status Errno(absl::string_view what, const std::string& path) {
  return absl::InternalError(absl::StrCat(what, " ", path, ": ", std::strerror(errno)));
}

std::string Base32OfHex(const std::string& hex) {
  NixHash h;
  h.algo = HashAlgo::kSha256;
  h.bytes = absl::HexStringToBytes(hex);
  return h.Base32();
}

}  // namespace

absl::StatusOr<std::unique_ptr<NarFileWriter>> NarFileWriter::Create(const std::string& dir) {
  std::string path = absl::StrCat(dir, "/.upload-XXXXXX");
  const int fd = ::mkstemp(path.data());
  if (fd < 0) return Errno("cannot create a file in", dir);
  return std::unique_ptr<NarFileWriter>(new NarFileWriter(fd, std::move(path)));
}

NarFileWriter::NarFileWriter(int fd, std::string path)
    : fd_(fd), path_(std::move(path)), zstd_(ZSTD_createCCtx()), out_(ZSTD_CStreamOutSize()) {
  ZSTD_CCtx_setParameter(zstd_.get(), ZSTD_c_compressionLevel, kZstdLevel);
}

NarFileWriter::~NarFileWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!kept_) ::unlink(path_.c_str());
}

absl::Status NarFileWriter::Compress(absl::string_view in, ZSTD_EndDirective mode) {
  ZSTD_inBuffer input{in.data(), in.size(), 0};
  for (;;) {
    ZSTD_outBuffer output{out_.data(), out_.size(), 0};
    const size_t left = ZSTD_compressStream2(zstd_.get(), &output, &input, mode);
    if (ZSTD_isError(left)) return absl::InternalError(absl::StrCat("zstd: ", ZSTD_getErrorName(left)));
    const char* data = out_.data();
    size_t size = output.pos;
    file_sha_.Update(absl::string_view(data, size));
    file_size_ += size;
    while (size > 0) {
      const ssize_t n = ::write(fd_, data, size);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return Errno("cannot write", path_);
      data += n;
      size -= static_cast<size_t>(n);
    }
    if (mode == ZSTD_e_end ? left == 0 : input.pos == input.size) return absl::OkStatus();
  }
}

absl::Status NarFileWriter::Write(absl::string_view nar_bytes) {
  nar_sha_.Update(nar_bytes);
  nar_size_ += nar_bytes.size();
  return Compress(nar_bytes, ZSTD_e_continue);
}

absl::StatusOr<CompressedNar> NarFileWriter::Finish(bool sync) {
  RETURN_IF_ERROR(Compress("", ZSTD_e_end));
  if (sync && ::fsync(fd_) != 0) return Errno("cannot sync", path_);
  ::close(fd_);
  fd_ = -1;
  kept_ = true;
  CompressedNar nar;
  nar.file = path_;
  const std::string file_base32 = Base32OfHex(file_sha_.FinishHex());
  nar.name = absl::StrCat(file_base32, kCompressedNarSuffix);
  nar.file_hash = absl::StrCat("sha256:", file_base32);
  nar.file_size = file_size_;
  nar.nar_hash = absl::StrCat("sha256:", Base32OfHex(nar_sha_.FinishHex()));
  nar.nar_size = nar_size_;
  return nar;
}

}  // namespace kiln
