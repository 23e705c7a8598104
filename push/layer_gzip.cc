#include "push/layer_gzip.h"

#include <libdeflate.h>
#if KILN_HAVE_ISAL
#include <isa-l/igzip_lib.h>
#endif

#include <algorithm>
#include <cstring>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace kiln {
namespace {

// Samples of a member, compressed at level 1, that shrink by less than 1/32
// in all: the member is taken for incompressible.
constexpr size_t kSamples = 4;
constexpr size_t kSampleBytes = 16 << 10;

// The gzip header of members Kiln writes itself (stored, or deflated by
// igzip): deflate, no flags, mtime 0, OS unknown.
constexpr unsigned char kGzipHeader[10] = {0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff};

#if KILN_HAVE_ISAL
// The level of igzip "fast" stands for. Measured end to end (compress,
// send, the registry hashing what it gets): level 1's larger output costs
// more than it saves, level 3 takes 5-15% longer for 0.3-1% fewer bytes.
constexpr int kIgzipLevel = 2;

// `in` deflated by igzip in one call into `room` bytes at `out`, with
// `gzip_flag`'s framing; `level_buf` holds the hash tables levels above 0
// need. Returns the bytes written, 0 when they do not fit.
size_t Igzip(absl::string_view in, int level, std::vector<unsigned char>* level_buf, uint16_t gzip_flag, char* out,
             size_t room) {
  isal_zstream z;
  isal_deflate_stateless_init(&z);
  z.level = static_cast<uint32_t>(level);
  if (level_buf != nullptr) {
    z.level_buf = level_buf->data();
    z.level_buf_size = static_cast<uint32_t>(level_buf->size());
  }
  z.gzip_flag = gzip_flag;
  z.end_of_stream = 1;
  z.flush = NO_FLUSH;
  z.next_in = reinterpret_cast<uint8_t*>(const_cast<char*>(in.data()));
  z.avail_in = static_cast<uint32_t>(in.size());
  z.next_out = reinterpret_cast<uint8_t*>(out);
  z.avail_out = static_cast<uint32_t>(room);
  return isal_deflate_stateless(&z) == COMP_OK ? z.total_out : 0;
}
#endif

// A gzip member of stored deflate blocks (RFC 1951 3.2.4): the bytes as
// they are, framed, with their CRC-32. `out` has room (StoredBound).
size_t StoredMember(absl::string_view in, char* out) {
  std::memcpy(out, kGzipHeader, sizeof kGzipHeader);
  size_t n = sizeof kGzipHeader;
  const auto put16 = [&](uint32_t v) {
    out[n++] = static_cast<char>(v & 0xff);
    out[n++] = static_cast<char>((v >> 8) & 0xff);
  };
  for (size_t at = 0; at < in.size() || at == 0;) {
    const size_t len = std::min<size_t>(0xffff, in.size() - at);
    out[n++] = static_cast<char>(at + len == in.size() ? 1 : 0);  // BFINAL, BTYPE 00.
    put16(static_cast<uint32_t>(len));
    put16(static_cast<uint32_t>(~len & 0xffff));
    std::memcpy(out + n, in.data() + at, len);
    n += len;
    at += len;
    if (len == 0) break;
  }
  const uint32_t crc = libdeflate_crc32(0, in.data(), in.size());
  const uint32_t isize = static_cast<uint32_t>(in.size());
  put16(crc & 0xffff);
  put16(crc >> 16);
  put16(isize & 0xffff);
  put16(isize >> 16);
  return n;
}

// Room for a stored member of kMemberBytes: 5 bytes of framing per 64 KiB
// block, 18 of header and trailer.
constexpr size_t StoredBound(size_t bytes) { return bytes + 5 * (bytes / 0xffff + 1) + 18; }

}  // namespace

absl::StatusOr<int> ParseGzipLevel(absl::string_view text) {
  int level = 0;
  if (text == "fast") {
#if KILN_HAVE_ISAL
    return kFastGzip;
#else
    return absl::InvalidArgumentError("gzip level \"fast\": this build of Kiln has no ISA-L (use 1 … 9)");
#endif
  }
  if (absl::SimpleAtoi(text, &level) && level >= 1 && level <= 9) return level;
  return absl::InvalidArgumentError(
      absl::StrCat("gzip level \"", text, "\": expected 1 (fastest) … 9 (smallest), or fast (ISA-L's igzip)"));
}

std::string GzipLevelName(int level) { return level == kFastGzip ? "fast" : absl::StrCat(level); }

MemberCompressor::~MemberCompressor() {
  if (compressor_ != nullptr) libdeflate_free_compressor(compressor_);
  if (sampler_ != nullptr) libdeflate_free_compressor(sampler_);
}

absl::Status MemberCompressor::Init(int level) {
  sampler_ = libdeflate_alloc_compressor(1);
  if (level != kFastGzip) compressor_ = libdeflate_alloc_compressor(std::clamp(level, 1, 12));
  if (sampler_ == nullptr || (level != kFastGzip && compressor_ == nullptr)) {
    return absl::InternalError("libdeflate: cannot allocate a compressor");
  }
  if (level == kFastGzip) {
#if KILN_HAVE_ISAL
    igzip_buffer_.resize(ISAL_DEF_LVL2_DEFAULT);
#else
    return absl::InvalidArgumentError("gzip level \"fast\": this build of Kiln has no ISA-L");
#endif
  }
  // igzip gets the same room; a member it cannot fit there is stored.
  bound_ = std::max(libdeflate_gzip_compress_bound(sampler_, kMemberBytes), StoredBound(kMemberBytes));
  return absl::OkStatus();
}

size_t MemberCompressor::IgzipMember(absl::string_view in, std::string& out) {
#if !KILN_HAVE_ISAL
  return StoredMember(in, out.data());  // Unreachable: Init refuses kFastGzip.
#else
  // IGZIP_GZIP_NO_HDR: igzip writes the trailer (CRC-32, size), we the header.
  std::memcpy(out.data(), kGzipHeader, sizeof kGzipHeader);
  const size_t n = Igzip(in, kIgzipLevel, &igzip_buffer_, IGZIP_GZIP_NO_HDR, out.data() + sizeof kGzipHeader,
                         out.size() - sizeof kGzipHeader);
  return n == 0 ? StoredMember(in, out.data()) : sizeof kGzipHeader + n;
#endif
}

size_t MemberCompressor::Sample(const char* in, std::string& scratch) {
#if KILN_HAVE_ISAL
  // At "fast", igzip's level 0 samples: at ~4x libdeflate level 1's speed it
  // keeps sampling from costing a tenth of the member's time.
  if (compressor_ == nullptr) {
    return Igzip(absl::string_view(in, kSampleBytes), 0, nullptr, IGZIP_DEFLATE, scratch.data(), scratch.size());
  }
#endif
  return libdeflate_deflate_compress(sampler_, in, kSampleBytes, scratch.data(), scratch.size());
}

bool MemberCompressor::Incompressible(absl::string_view in, std::string& scratch) {
  if (in.size() < kSamples * kSampleBytes) return false;
  size_t total_in = 0, total_out = 0;
  for (size_t i = 0; i < kSamples; ++i) {
    const size_t n = Sample(in.data() + (in.size() - kSampleBytes) * i / (kSamples - 1), scratch);
    total_in += kSampleBytes;
    total_out += n == 0 ? kSampleBytes : n;
  }
  return total_out >= total_in - total_in / 32;
}

absl::StatusOr<size_t> MemberCompressor::Compress(absl::string_view in, std::string& out) {
  if (in.size() > kMemberBytes) return absl::InternalError("gzip member larger than its bound");
  if (out.size() < bound_) out.resize(bound_);
  const size_t n = Incompressible(in, out) ? StoredMember(in, out.data())
                   : compressor_ == nullptr
                       ? IgzipMember(in, out)
                       : libdeflate_gzip_compress(compressor_, in.data(), in.size(), out.data(), out.size());
  if (n == 0) return absl::InternalError("libdeflate: compressed data larger than its bound");
  return n;
}

GzipMemberPool::GzipMemberPool(int level, int threads) {
  for (int t = 0; t < std::max(1, threads); ++t) threads_.emplace_back([this, level] { Run(level); });
}

GzipMemberPool::~GzipMemberPool() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  for (std::thread& t : threads_) t.join();
}

void GzipMemberPool::Submit(std::shared_ptr<GzipMember> member) {
  absl::MutexLock lock(&mu_);
  queue_.push_back(std::move(member));
}

void GzipMemberPool::Wait(const GzipMember& member) {
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(
      +[](const GzipMember* m) { return m->done; }, &member));
}

void GzipMemberPool::Run(int level) {
  MemberCompressor compressor;
  const absl::Status ready = compressor.Init(level);
  for (;;) {
    std::shared_ptr<GzipMember> m;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](GzipMemberPool* p) ABSL_EXCLUSIVE_LOCKS_REQUIRED(p->mu_) { return !p->queue_.empty() || p->stopping_; },
          this));
      if (queue_.empty()) return;
      m = std::move(queue_.front());
      queue_.pop_front();
    }
    // The member is this thread's until `done` is set.
    absl::StatusOr<size_t> n = ready.ok() ? compressor.Compress(m->input, m->output) : absl::StatusOr<size_t>(ready);
    m->status = n.status();
    m->output_size = n.ok() ? *n : 0;
    absl::MutexLock lock(&mu_);
    m->done = true;
  }
}

// Members still in the pool (after an error) are shared with it: they go
// when it is done with them.
LayerGzip::~LayerGzip() { Close(); }

absl::Status LayerGzip::Open(const std::string& path, int level, GzipMemberPool* pool) {
  path_ = path;
  out_ = std::fopen(path.c_str(), "wb");
  if (out_ == nullptr) return absl::InternalError(absl::StrCat("cannot create ", path));
  return Init(level, pool);
}

absl::Status LayerGzip::OpenSink(Sink sink, int level, GzipMemberPool* pool) {
  sink_ = std::move(sink);
  return Init(level, pool);
}

absl::Status LayerGzip::Init(int level, GzipMemberPool* pool) {
  pool_ = pool;
  pending_.reserve(kMemberBytes);
  if (pool_ != nullptr) {
    // Enough members handed over to keep every thread busy while the
    // oldest is emitted.
    max_in_flight_ = static_cast<size_t>(2 * pool_->threads());
    return absl::OkStatus();
  }
  return compressor_.Init(level);
}

absl::Status LayerGzip::Write(absl::string_view data) {
  while (!data.empty()) {
    const size_t n = std::min(data.size(), kMemberBytes - pending_.size());
    pending_.append(data.data(), n);
    data.remove_prefix(n);
    if (pending_.size() == kMemberBytes) {
      RETURN_IF_ERROR(EndMember());
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<CompressedLayer> LayerGzip::Finish() {
  // An empty layer is still one (empty) member: a valid gzip stream.
  if (!pending_.empty() || !any_member_) {
    RETURN_IF_ERROR(EndMember());
  }
  while (!in_flight_.empty()) {
    RETURN_IF_ERROR(EmitOldest());
  }
  Close();
  return CompressedLayer{absl::StrCat("sha256:", hash_.FinishHex()), size_};
}

absl::Status LayerGzip::EndMember() {
  any_member_ = true;
  if (pool_ == nullptr) {
    absl::StatusOr<size_t> n = compressor_.Compress(pending_, out_buf_);
    pending_.clear();
    if (!n.ok()) return n.status();
    return Emit(absl::string_view(out_buf_.data(), *n));
  }
  std::shared_ptr<GzipMember> m;
  if (spare_.empty()) {
    m = std::make_shared<GzipMember>();
  } else {
    m = std::move(spare_.back());
    spare_.pop_back();
  }
  m->done = false;  // Not in the pool: nothing else sees it yet.
  std::swap(m->input, pending_);
  pending_.clear();
  pending_.reserve(kMemberBytes);
  in_flight_.push_back(m);
  pool_->Submit(std::move(m));
  while (in_flight_.size() > max_in_flight_) {
    RETURN_IF_ERROR(EmitOldest());
  }
  return absl::OkStatus();
}

absl::Status LayerGzip::EmitOldest() {
  std::shared_ptr<GzipMember> m = std::move(in_flight_.front());
  in_flight_.pop_front();
  pool_->Wait(*m);
  absl::Status s = m->status.ok() ? Emit(absl::string_view(m->output.data(), m->output_size)) : m->status;
  m->input.clear();
  spare_.push_back(std::move(m));
  return s;
}

absl::Status LayerGzip::Emit(absl::string_view piece) {
  if (sink_) {
    RETURN_IF_ERROR(sink_(piece));
  } else if (std::fwrite(piece.data(), 1, piece.size(), out_) != piece.size()) {
    return absl::InternalError(absl::StrCat("cannot write ", path_));
  }
  hash_.Update(piece);
  size_ += piece.size();
  return absl::OkStatus();
}

void LayerGzip::Close() {
  if (out_ != nullptr) std::fclose(out_);
  out_ = nullptr;
}

}  // namespace kiln
