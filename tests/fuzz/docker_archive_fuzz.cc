// Fuzz target: an image archive as a worker or `kiln push` reads it from a
// pipe (tar or gzip through libarchive, then manifest.json and the config).
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>

#include "push/docker_archive.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const int fd = ::memfd_create("kiln-fuzz-archive", MFD_CLOEXEC);
  if (fd < 0) return 0;
  size_t done = 0;
  while (done < size) {
    const ssize_t n = ::write(fd, data + done, size - done);
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  ::lseek(fd, 0, SEEK_SET);
  uint64_t bytes = 0;
  (void)kiln::ReadDockerArchiveStream(
      fd, "fuzz",
      [&](const std::string&, absl::string_view chunk) {
        bytes += chunk.size();
        return absl::OkStatus();
      },
      [](const std::string&) { return absl::OkStatus(); });
  ::close(fd);
  return 0;
}
