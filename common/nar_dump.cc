#include "common/nar_dump.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace kiln {
namespace {

constexpr size_t kFlushBytes = 256 << 10;

absl::Status Errno(absl::string_view what, const std::string& path) {
  return absl::InternalError(absl::StrCat("cannot ", what, " ", path, ": ", std::strerror(errno)));
}

// Buffers the NAR's tokens and hands them to the sink in large pieces.
class NarWriter {
 public:
  explicit NarWriter(NarSink sink) : sink_(sink) { buffer_.reserve(kFlushBytes + 4096); }

  absl::Status Token(absl::string_view s) {
    RETURN_IF_ERROR(Length(s.size()));
    RETURN_IF_ERROR(Raw(s));
    return Pad(s.size());
  }
  absl::Status Length(uint64_t n) {
    char le[8];
    for (int i = 0; i < 8; ++i) le[i] = static_cast<char>((n >> (8 * i)) & 0xff);
    return Raw(absl::string_view(le, 8));
  }
  absl::Status Pad(uint64_t n) {
    static constexpr char kZeros[8] = {0};
    return Raw(absl::string_view(kZeros, (8 - n % 8) % 8));
  }
  absl::Status Raw(absl::string_view bytes) {
    if (bytes.size() >= kFlushBytes) {
      RETURN_IF_ERROR(Flush());
      return sink_(bytes);
    }
    buffer_.append(bytes.data(), bytes.size());
    if (buffer_.size() >= kFlushBytes) return Flush();
    return absl::OkStatus();
  }
  absl::Status Flush() {
    if (buffer_.empty()) return absl::OkStatus();
    absl::Status s = sink_(buffer_);
    buffer_.clear();
    return s;
  }

 private:
  NarSink sink_;
  std::string buffer_;
};

absl::Status DumpRegular(NarWriter& out, const std::string& path, const struct stat& st) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) return Errno("open", path);
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  RETURN_IF_ERROR(out.Token("type"));
  RETURN_IF_ERROR(out.Token("regular"));
  if ((st.st_mode & S_IXUSR) != 0) {
    RETURN_IF_ERROR(out.Token("executable"));
    RETURN_IF_ERROR(out.Token(""));
  }
  RETURN_IF_ERROR(out.Token("contents"));
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  RETURN_IF_ERROR(out.Length(size));
  std::vector<char> buf(static_cast<size_t>(std::min<uint64_t>(size, 1 << 20)) + 1);
  uint64_t left = size;
  while (left > 0) {
    const ssize_t n = ::read(fd, buf.data(), static_cast<size_t>(std::min<uint64_t>(left, buf.size())));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Errno("read", path);
    if (n == 0) return absl::DataLossError(absl::StrCat(path, " shrank while it was read"));
    RETURN_IF_ERROR(out.Raw(absl::string_view(buf.data(), static_cast<size_t>(n))));
    left -= static_cast<uint64_t>(n);
  }
  return out.Pad(size);
}

absl::Status DumpNode(NarWriter& out, const std::string& path, int depth) {
  if (depth > 256) return absl::InvalidArgumentError(absl::StrCat(path, ": directories nested too deep"));
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0) return Errno("stat", path);
  RETURN_IF_ERROR(out.Token("("));
  if (S_ISREG(st.st_mode)) {
    RETURN_IF_ERROR(DumpRegular(out, path, st));
  } else if (S_ISLNK(st.st_mode)) {
    std::string target(static_cast<size_t>(std::max<off_t>(st.st_size, 0)) + 1, '\0');
    const ssize_t n = ::readlink(path.c_str(), target.data(), target.size());
    if (n < 0) return Errno("read the link", path);
    target.resize(static_cast<size_t>(n));
    RETURN_IF_ERROR(out.Token("type"));
    RETURN_IF_ERROR(out.Token("symlink"));
    RETURN_IF_ERROR(out.Token("target"));
    RETURN_IF_ERROR(out.Token(target));
  } else if (S_ISDIR(st.st_mode)) {
    RETURN_IF_ERROR(out.Token("type"));
    RETURN_IF_ERROR(out.Token("directory"));
    std::vector<std::string> names;
    {
      DIR* dir = ::opendir(path.c_str());
      if (dir == nullptr) return Errno("list", path);
      errno = 0;
      while (const dirent* e = ::readdir(dir)) {
        const absl::string_view name = e->d_name;
        if (name != "." && name != "..") names.emplace_back(name);
      }
      const int err = errno;
      ::closedir(dir);
      if (err != 0) {
        errno = err;
        return Errno("list", path);
      }
    }
    std::sort(names.begin(), names.end());  // Byte order, as NARs require.
    for (const std::string& name : names) {
      RETURN_IF_ERROR(out.Token("entry"));
      RETURN_IF_ERROR(out.Token("("));
      RETURN_IF_ERROR(out.Token("name"));
      RETURN_IF_ERROR(out.Token(name));
      RETURN_IF_ERROR(out.Token("node"));
      RETURN_IF_ERROR(DumpNode(out, absl::StrCat(path, "/", name), depth + 1));
      RETURN_IF_ERROR(out.Token(")"));
    }
  } else {
    return absl::InvalidArgumentError(absl::StrCat(path, " is neither a file, a directory nor a symlink"));
  }
  return out.Token(")");
}

}  // namespace

absl::Status DumpPathAsNar(const std::string& path, NarSink sink) {
  NarWriter out(sink);
  RETURN_IF_ERROR(out.Token("nix-archive-1"));
  RETURN_IF_ERROR(DumpNode(out, path, 0));
  return out.Flush();
}

}  // namespace kiln
