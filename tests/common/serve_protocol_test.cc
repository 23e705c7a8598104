// The serve protocol's framing: what ServeWriter writes ServeReader reads
// back, byte for byte as Nix lays it out; and what a peer may not do
// (non-zero padding, a string or list over the limits, an end mid-frame) is
// refused without allocating for it.
#include "common/serve_protocol.h"

#include <gtest/gtest.h>

#include <cstring>

namespace kiln {
namespace {

// The reader keeps its own copy: callers pass temporaries.
ServeReader ReaderOver(std::string bytes, size_t* at, ServeLimits limits = {}) {
  return ServeReader(
      [bytes = std::move(bytes), at](char* buf, size_t size) -> absl::StatusOr<size_t> {
        // One byte at a time: every read crosses the buffer's edges.
        const size_t n = std::min<size_t>({size, 1, bytes.size() - *at});
        std::memcpy(buf, bytes.data() + *at, n);
        *at += n;
        return n;
      },
      limits);
}

TEST(ServeProtocolTest, FramesAsNixLaysThemOut) {
  ServeWriter w;
  w.U64(0x390c9deb).String("abc").Strings({"/nix/store/x", ""});
  const std::string& d = w.data();
  ASSERT_EQ(d.size(), 8u + (8 + 8) + (8 + (8 + 16) + 8));
  EXPECT_EQ(d.substr(0, 8), std::string("\xeb\x9d\x0c\x39\0\0\0\0", 8));
  EXPECT_EQ(d.substr(8, 16), std::string("\3\0\0\0\0\0\0\0abc\0\0\0\0\0", 16));
  size_t at = 0;
  ServeReader r = ReaderOver(d, &at);
  EXPECT_EQ(*r.U64(), 0x390c9debu);
  EXPECT_EQ(*r.String(), "abc");
  EXPECT_EQ(*r.Strings(), (std::vector<std::string>{"/nix/store/x", ""}));
  EXPECT_TRUE(absl::IsOutOfRange(r.U64().status())) << "the end between frames: the peer is done";
}

TEST(ServeProtocolTest, RefusesWhatAPeerMayNotSend) {
  std::string padded = ServeWriter().String("abc").data();
  padded[12] = 'x';
  size_t at = 0;
  ServeReader bad_padding = ReaderOver(padded, &at);
  EXPECT_TRUE(absl::IsDataLoss(bad_padding.String().status()));

  const std::string huge = ServeWriter().U64(uint64_t{1} << 40).data();
  at = 0;
  ServeReader big = ReaderOver(huge, &at, {.max_string_bytes = 1024, .max_list_items = 8});
  EXPECT_TRUE(absl::IsResourceExhausted(big.String().status()));
  at = 0;
  ServeReader many = ReaderOver(ServeWriter().U64(9).data(), &at, {.max_string_bytes = 1024, .max_list_items = 8});
  EXPECT_TRUE(absl::IsResourceExhausted(many.Strings().status()));

  const std::string cut = ServeWriter().String("abcdefgh").data().substr(0, 12);
  at = 0;
  ServeReader short_read = ReaderOver(cut, &at);
  EXPECT_TRUE(absl::IsDataLoss(short_read.String().status()));
  at = 0;
  ServeReader half_number = ReaderOver(std::string("\1\2\3", 3), &at);
  EXPECT_TRUE(absl::IsDataLoss(half_number.U64().status()));
}

// Transcripts of the build encodings per protocol version, written from
// Nix's sources (2.8's nix-store --serve and legacy-ssh-store, and today's
// serve-protocol.cc): what each minor version adds, in order.
TEST(ServeProtocolTest, BuildEncodingsByVersionAsNixLaysThemOut) {
  const ServeBuildOptions o{.max_silent_time = 1,
                            .build_timeout = 2,
                            .max_log_size = 3,
                            .build_repeat = 4,
                            .enforce_determinism = true,
                            .keep_failed = true};
  const auto options_at = [&](uint64_t version) {
    ServeWriter w;
    WriteServeBuildOptions(w, o, version);
    return w.data();
  };
  EXPECT_EQ(options_at(0x201), ServeWriter().U64(1).U64(2).data());
  EXPECT_EQ(options_at(0x202), ServeWriter().U64(1).U64(2).U64(3).data());
  EXPECT_EQ(options_at(0x203), ServeWriter().U64(1).U64(2).U64(3).U64(4).U64(1).data());
  EXPECT_EQ(options_at(0x207), ServeWriter().U64(1).U64(2).U64(3).U64(4).U64(1).U64(1).data());

  ServeBuildResult r;
  r.status = ServeBuildStatus::kBuilt;
  r.times_built = 1;
  r.start_time = 10;
  r.stop_time = 12;
  r.built_outputs = ServeBuiltOutputs({{"out", "/nix/store/mjd1qxbld5xcd5xjpbgq9af4nd8abl13-top"}});
  const auto result_at = [&](uint64_t version) {
    ServeWriter w;
    WriteServeBuildResult(w, r, version);
    return w.data();
  };
  EXPECT_EQ(result_at(0x202), ServeWriter().U64(0).String("").data());
  EXPECT_EQ(result_at(0x203), ServeWriter().U64(0).String("").U64(1).U64(0).U64(10).U64(12).data());
  const std::string id = "sha256:" + std::string(64, '0') + "!out";
  EXPECT_EQ(result_at(0x206), ServeWriter()
                                  .U64(0)
                                  .String("")
                                  .U64(1)
                                  .U64(0)
                                  .U64(10)
                                  .U64(12)
                                  .U64(1)
                                  .String(id)
                                  .String(R"({"id":")" + id + R"(","outPath":"mjd1qxbld5xcd5xjpbgq9af4nd8abl13-top"})")
                                  .data());
  EXPECT_EQ(result_at(0x207), result_at(0x206)) << "2.7 changed the build options only";
}

}  // namespace
}  // namespace kiln
