#include "coordinator/job_log.h"

#include <libdeflate.h>

#include <memory>

#include "absl/status/status.h"

namespace kiln {
namespace {

constexpr char kVersion = 1;

struct CompressorDeleter {
  void operator()(libdeflate_compressor* c) const { libdeflate_free_compressor(c); }
};
struct DecompressorDeleter {
  void operator()(libdeflate_decompressor* d) const { libdeflate_free_decompressor(d); }
};

void AppendVarint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7F) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}

bool ReadVarint(absl::string_view& in, uint64_t* v) {
  *v = 0;
  for (int shift = 0; shift < 64 && !in.empty(); shift += 7) {
    const auto byte = static_cast<unsigned char>(in.front());
    in.remove_prefix(1);
    *v |= static_cast<uint64_t>(byte & 0x7F) << shift;
    if ((byte & 0x80) == 0) return true;
  }
  return false;
}

}  // namespace

std::string EncodeStoredLog(const kiln::state::v1::StoredLog& log) {
  const std::string plain = log.SerializeAsString();
  // Level 6: logs are written once, on the strand, and read rarely; the
  // ratio matters more than the last millisecond.
  std::unique_ptr<libdeflate_compressor, CompressorDeleter> compressor(libdeflate_alloc_compressor(6));
  std::string out(1, kVersion);
  AppendVarint(out, plain.size());
  const size_t header = out.size();
  out.resize(header + libdeflate_zlib_compress_bound(compressor.get(), plain.size()));
  const size_t n =
      libdeflate_zlib_compress(compressor.get(), plain.data(), plain.size(), out.data() + header, out.size() - header);
  out.resize(header + n);
  return out;
}

absl::StatusOr<kiln::state::v1::StoredLog> DecodeStoredLog(absl::string_view bytes, size_t max_bytes) {
  if (bytes.empty() || bytes.front() != kVersion) return absl::DataLossError("stored log: unknown format");
  bytes.remove_prefix(1);
  uint64_t size = 0;
  if (!ReadVarint(bytes, &size) || size > max_bytes) return absl::DataLossError("stored log: bad size");
  std::string plain(size, '\0');
  std::unique_ptr<libdeflate_decompressor, DecompressorDeleter> decompressor(libdeflate_alloc_decompressor());
  size_t actual = 0;
  if (libdeflate_zlib_decompress(decompressor.get(), bytes.data(), bytes.size(), plain.data(), plain.size(), &actual) !=
          LIBDEFLATE_SUCCESS ||
      actual != size) {
    return absl::DataLossError("stored log: corrupt");
  }
  kiln::state::v1::StoredLog log;
  if (!log.ParseFromString(plain)) return absl::DataLossError("stored log: unreadable");
  return log;
}

}  // namespace kiln
