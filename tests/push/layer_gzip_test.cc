// LayerGzip: a layer's gzip members compressed on the writing thread or in
// a pool give the same bytes, read back (member by member) to the input.
#include "push/layer_gzip.h"

#include <gtest/gtest.h>
#include <libdeflate.h>

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/digest.h"

namespace kiln {
namespace {

// Text, then bytes no compressor can shrink, then text: deflated, stored
// and deflated members, with a short member at the end.
std::string MixedLayer(uint64_t seed, size_t text_bytes, size_t noise_bytes) {
  std::string out;
  for (uint64_t i = 0; out.size() < text_bytes; ++i)
    absl::StrAppend(&out, "line ", (i + seed) * 2654435761u % 1000003, "\n");
  uint64_t x = 88172645463325252u ^ seed;  // xorshift64
  for (size_t i = 0; i < noise_bytes; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    out.push_back(static_cast<char>(x >> 56));
  }
  for (uint64_t i = 0; out.size() < 2 * text_bytes + noise_bytes; ++i) absl::StrAppend(&out, "word", i % 977, " ");
  out.resize(2 * text_bytes + noise_bytes);
  return out;
}

struct Compressed {
  std::string bytes;
  CompressedLayer layer;
};

// `input` written in pieces of `piece` bytes.
Compressed Compress(const std::string& input, GzipMemberPool* pool, size_t piece = 7777, int level = 6) {
  Compressed c;
  LayerGzip gz;
  EXPECT_TRUE(gz.OpenSink(
                    [&c](absl::string_view p) {
                      c.bytes.append(p.data(), p.size());
                      return absl::OkStatus();
                    },
                    level, pool)
                  .ok());
  for (size_t at = 0; at < input.size(); at += piece) {
    EXPECT_TRUE(gz.Write(absl::string_view(input).substr(at, piece)).ok());
  }
  absl::StatusOr<CompressedLayer> layer = gz.Finish();
  EXPECT_TRUE(layer.ok()) << layer.status();
  if (layer.ok()) c.layer = *layer;
  return c;
}

// Every member of the stream, inflated and joined; the member count in
// `members`.
std::string Gunzip(const std::string& gz, size_t* members) {
  libdeflate_decompressor* d = libdeflate_alloc_decompressor();
  std::string out, buf(LayerGzip::kMemberBytes, '\0');
  *members = 0;
  for (size_t at = 0; at < gz.size();) {
    size_t in = 0, produced = 0;
    const libdeflate_result r =
        libdeflate_gzip_decompress_ex(d, gz.data() + at, gz.size() - at, buf.data(), buf.size(), &in, &produced);
    if (r != LIBDEFLATE_SUCCESS) {
      ADD_FAILURE() << "member " << *members << " at byte " << at << " does not inflate";
      break;
    }
    out.append(buf.data(), produced);
    at += in;
    ++*members;
  }
  libdeflate_free_decompressor(d);
  return out;
}

TEST(LayerGzipTest, APoolGivesTheSameBytesAsOneThreadAndTheyInflateToTheLayer) {
  const std::string input = MixedLayer(1, 5u << 19, 2u << 20);  // 7 MiB: 7 members.
  const Compressed one = Compress(input, nullptr);
  EXPECT_EQ(one.layer.size, one.bytes.size());
  EXPECT_EQ(one.layer.digest, "sha256:" + Sha256Hex(one.bytes));
  EXPECT_LT(one.bytes.size(), input.size() - (2u << 19));  // The text shrank.
  size_t members = 0;
  EXPECT_EQ(Gunzip(one.bytes, &members), input);
  EXPECT_EQ(members, 7u);
  for (int threads : {1, 2, 5}) {
    GzipMemberPool pool(6, threads);
    const Compressed pooled = Compress(input, &pool, threads == 2 ? LayerGzip::kMemberBytes : 7777);
    EXPECT_EQ(pooled.bytes, one.bytes) << threads << " thread(s)";
    EXPECT_EQ(pooled.layer.digest, one.layer.digest);
    EXPECT_EQ(pooled.layer.size, one.layer.size);
  }
}

// "fast" is igzip, not a libdeflate level: its own bytes, the same on one
// thread or many, read back by another inflater to the layer.
TEST(LayerGzipTest, TheFastLevelIsIgzipAndGivesTheSameBytesOnOneThreadOrMany) {
  const std::string input = MixedLayer(2, 5u << 19, 2u << 20);
  const Compressed one = Compress(input, nullptr, 7777, kFastGzip);
  EXPECT_EQ(one.layer.digest, "sha256:" + Sha256Hex(one.bytes));
  EXPECT_LT(one.bytes.size(), input.size() - (2u << 19));
  EXPECT_NE(one.bytes, Compress(input, nullptr, 7777, kDefaultGzipLevel).bytes);
  size_t members = 0;
  EXPECT_EQ(Gunzip(one.bytes, &members), input);
  EXPECT_EQ(members, 7u);
  for (int threads : {1, 2, 5}) {
    GzipMemberPool pool(kFastGzip, threads);
    EXPECT_EQ(Compress(input, &pool, 65536, kFastGzip).bytes, one.bytes) << threads << " thread(s)";
  }
  const Compressed empty = Compress("", nullptr, 7777, kFastGzip);
  EXPECT_EQ(Gunzip(empty.bytes, &members), "");
  // Noise is stored at this level too: its framing and no more (5 bytes
  // per 64 KiB block, 18 per member).
  const std::string noise = MixedLayer(5, 0, 2u << 20);
  const Compressed stored = Compress(noise, nullptr, 7777, kFastGzip);
  EXPECT_LE(stored.bytes.size(), noise.size() + 2 * (5 * 17 + 18));
  EXPECT_EQ(Gunzip(stored.bytes, &members), noise);
  EXPECT_EQ(members, 2u);
}

TEST(LayerGzipTest, LevelsAreOneToNineOrFast) {
  EXPECT_EQ(ParseGzipLevel("fast").value_or(-1), kFastGzip);
  EXPECT_EQ(ParseGzipLevel("1").value_or(-1), 1);
  EXPECT_EQ(ParseGzipLevel("9").value_or(-1), 9);
  for (const char* bad : {"0", "10", "-1", "six", "", "4x"}) {
    absl::StatusOr<int> level = ParseGzipLevel(bad);
    ASSERT_FALSE(level.ok()) << bad;
    EXPECT_EQ(level.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(level.status().message().find(absl::StrCat("\"", bad, "\"")), absl::string_view::npos) << level.status();
  }
  EXPECT_EQ(GzipLevelName(kFastGzip), "fast");
  EXPECT_EQ(GzipLevelName(4), "4");
}

TEST(LayerGzipTest, AnEmptyLayerIsOneEmptyMemberEitherWay) {
  GzipMemberPool pool(6, 2);
  const Compressed one = Compress("", nullptr);
  const Compressed pooled = Compress("", &pool);
  EXPECT_EQ(pooled.bytes, one.bytes);
  size_t members = 0;
  EXPECT_EQ(Gunzip(one.bytes, &members), "");
  EXPECT_EQ(members, 1u);
}

TEST(LayerGzipTest, WritersSharingAPoolEachGetTheirOwnLayer) {
  GzipMemberPool pool(1, 2);
  constexpr int kWriters = 4;
  std::vector<std::string> inputs;
  for (int w = 0; w < kWriters; ++w) inputs.push_back(MixedLayer(w + 10, (w + 1) << 19, (3 - w) << 19));
  std::vector<Compressed> results(kWriters);
  std::vector<std::thread> writers;
  for (int w = 0; w < kWriters; ++w) {
    writers.emplace_back([&, w] { results[w] = Compress(inputs[w], &pool, 65536 + w, 1); });
  }
  for (auto& t : writers) t.join();
  for (int w = 0; w < kWriters; ++w) {
    EXPECT_EQ(results[w].bytes, Compress(inputs[w], nullptr, 65536, 1).bytes) << "writer " << w;
    size_t members = 0;
    EXPECT_EQ(Gunzip(results[w].bytes, &members), inputs[w]) << "writer " << w;
  }
}

TEST(LayerGzipTest, ASinkErrorEndsTheLayerWithIt) {
  GzipMemberPool pool(6, 2);
  const std::string input = MixedLayer(3, 4u << 20, 0);
  LayerGzip gz;
  int pieces = 0;
  ASSERT_TRUE(gz.OpenSink(
                    [&pieces](absl::string_view) {
                      return ++pieces == 2 ? absl::UnavailableError("registry went away") : absl::OkStatus();
                    },
                    6, &pool)
                  .ok());
  absl::Status status = gz.Write(input);
  absl::StatusOr<CompressedLayer> layer = status.ok() ? gz.Finish() : absl::StatusOr<CompressedLayer>(status);
  ASSERT_FALSE(layer.ok());
  EXPECT_EQ(layer.status().message(), "registry went away");
  // The writer is destroyed with members still in the pool: they are
  // shared, so this is safe (checked under ASan and TSan).
}

}  // namespace
}  // namespace kiln
