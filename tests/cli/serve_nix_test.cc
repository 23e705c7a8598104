// The serve-nix session over an in-memory farm store (a fake, named so):
// bad input on the protocol stream — a truncated frame, an absurd length, a
// path outside the store, an unknown version or command — ends the session
// with an error and changes nothing in the farm; a path the farm already
// holds is read past, so the next command is understood.
#include "cli/serve_nix.h"

#include <gtest/gtest.h>
#include <zstd.h>

#include <cstring>
#include <map>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/digest.h"
#include "common/nix_hash.h"
#include "common/narinfo.h"
#include "common/status_macros.h"
#include "tests/support/nar_builder.h"

namespace kiln {
namespace {

constexpr char kHeld[] = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-held";
constexpr char kNew[] = "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-new";

class FakeServeFarm final : public FarmStoreClient {
 public:
  absl::StatusOr<std::vector<std::string>> Missing(const std::vector<std::string>& paths) override {
    ++questions;
    std::vector<std::string> missing;
    for (const std::string& p : paths) {
      if (p != kHeld) missing.push_back(p);
    }
    return missing;
  }
  absl::Status AddPath(const kiln::v1::PathInfo& info, absl::FunctionRef<absl::Status(NarSink)> write_nar) override {
    if (info.store_path() == kHeld) return absl::OkStatus();  // Held: reads none of it, as the farm does.
    std::string nar;
    RETURN_IF_ERROR(write_nar([&](absl::string_view b) {
      nar.append(b.data(), b.size());
      return absl::OkStatus();
    }));
    added[info.store_path()] = nar;
    infos[info.store_path()] = info;
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> PublicKey() override { return "k:AAAA"; }
  absl::StatusOr<std::string> NarInfo(const std::string& hash_part) override {
    if (hash_part != "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa") return absl::NotFoundError("absent");
    kiln::NarInfo info;
    info.store_path = kHeld;
    info.url = "nar/x.nar.zst";
    info.compression = "zstd";
    info.nar_hash = "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";
    info.nar_size = claimed_nar_size;
    return info.Render();
  }
  absl::Status FetchNar(const std::string&, NarSink sink) override {
    std::string z(ZSTD_compressBound(nar.size()), '\0');
    z.resize(ZSTD_compress(z.data(), z.size(), nar.data(), nar.size(), 1));
    return sink(z);
  }

  std::string nar = "the held path's NAR";
  uint64_t claimed_nar_size = 19;
  int questions = 0;
  std::map<std::string, std::string> added;
  std::map<std::string, kiln::v1::PathInfo> infos;
};

// A builder never asked (a fake): plain paths need no build.
class FakeBuilderForPaths final : public DerivationBuilder {
 public:
  absl::StatusOr<ServeBuildResult> Build(const std::string&, const ServeDerivation&, const ServeBuildOptions&,
                                         absl::FunctionRef<void(absl::string_view)>) override {
    return absl::InternalError("not expected");
  }
};

struct Outcome {
  absl::Status status;
  std::string out;
};

ServeWriter Hello() { return std::move(ServeWriter().U64(kServeMagic1).U64(kServeProtocolVersion)); }

Outcome RunSession(FakeServeFarm& farm, const std::string& input, DerivationBuilder* builder = nullptr) {
  size_t at = 0;
  ServeReader in(
      [&](char* buf, size_t size) -> absl::StatusOr<size_t> {
        const size_t n = std::min(size, input.size() - at);
        std::memcpy(buf, input.data() + at, n);
        at += n;
        return n;
      },
      ServeLimits{.max_string_bytes = 4096, .max_list_items = 16});
  Outcome o;
  o.status = RunServeSession(
      in,
      [&](absl::string_view b) {
        o.out.append(b.data(), b.size());
        return absl::OkStatus();
      },
      farm, nullptr, builder);
  return o;
}

ServeWriter& AddToStoreNar(ServeWriter& w, const std::string& path, const std::string& nar) {
  return w.U64(static_cast<uint64_t>(ServeCommand::kAddToStoreNar))
      .String(path)
      .String("")
      .String(Sha256Hex(nar))
      .Strings({})
      .U64(0)
      .U64(nar.size())
      .U64(0)
      .Strings({})
      .String("")
      .Raw(nar);
}

constexpr char kOther[] = "/nix/store/ffffffffffffffffffffffffffffffff-other";

// A session that imports `paths` (path, NAR) in nix-store --export's
// format, each referring to the one before.
std::string ImportPaths(const std::vector<std::pair<std::string, std::string>>& paths) {
  ServeWriter w = Hello();
  w.U64(static_cast<uint64_t>(ServeCommand::kImportPaths));
  std::string previous;
  for (const auto& [path, nar] : paths) {
    w.U64(1).Raw(nar).U64(0x4558494e).String(path);
    w.Strings(previous.empty() ? std::vector<std::string>{} : std::vector<std::string>{previous});
    w.String("").U64(0);
    previous = path;
  }
  w.U64(0);
  return w.data();
}

TEST(ServeNixSessionTest, ImportsPathsInNixStoreExportsFormat) {
  FakeServeFarm farm;
  const std::string first = testing::NarArchive(testing::NarFile("first\n"));
  const std::string second = testing::NarArchive(testing::NarDirectory({{"f", testing::NarFile("second")}}));
  const Outcome o = RunSession(farm, ImportPaths({{kNew, first}, {kOther, second}}) +
                                         ServeWriter()
                                             .U64(static_cast<uint64_t>(ServeCommand::kQueryValidPaths))
                                             .U64(0)
                                             .U64(0)
                                             .Strings({kHeld})
                                             .data());
  ASSERT_TRUE(o.status.ok()) << o.status;
  EXPECT_EQ(o.out, ServeWriter().U64(kServeMagic2).U64(kServeProtocolVersion).U64(1).Strings({kHeld}).data())
      << "the stream after the import was not read where it starts";
  ASSERT_EQ(farm.added.size(), 2u);
  EXPECT_EQ(farm.added[kNew], first);
  EXPECT_EQ(farm.added[kOther], second);
  EXPECT_EQ(farm.infos[kOther].nar_hash(), "sha256:" + Sha256Hex(second));
  EXPECT_EQ(farm.infos[kOther].nar_size(), second.size());
  EXPECT_EQ(farm.infos[kOther].references(0), kNew);
}

// build-paths of paths that are no derivations: valid ones answer 0, a
// missing one Nix's failure status and a message.
TEST(ServeNixSessionTest, BuildPathsOfPlainPathsAnswersAsNixDoes) {
  FakeServeFarm farm;
  FakeBuilderForPaths builder;
  ServeWriter w = Hello();
  w.U64(static_cast<uint64_t>(ServeCommand::kBuildPaths)).Strings({kHeld});
  WriteServeBuildOptions(w, {}, kServeProtocolVersion);
  w.U64(static_cast<uint64_t>(ServeCommand::kBuildPaths)).Strings({kHeld, kNew});
  WriteServeBuildOptions(w, {}, kServeProtocolVersion);
  const Outcome o = RunSession(farm, w.data(), &builder);
  ASSERT_TRUE(o.status.ok()) << o.status;
  const std::string head = ServeWriter().U64(kServeMagic2).U64(kServeProtocolVersion).U64(0).U64(9).data();
  ASSERT_GT(o.out.size(), head.size());
  EXPECT_EQ(o.out.substr(0, head.size()), head);
  EXPECT_TRUE(absl::StrContains(o.out, "is not valid in the farm store")) << o.out;
}

TEST(ServeNixSessionTest, AnswersValidPathsAndAddsWhatTheClientSends) {
  FakeServeFarm farm;
  const std::string nar = testing::NarArchive(testing::NarFile("new\n"));
  ServeWriter w = Hello();
  w.U64(static_cast<uint64_t>(ServeCommand::kQueryValidPaths)).U64(0).U64(0).Strings({kHeld, kNew});
  AddToStoreNar(w, kHeld, nar);  // Held: read past, not added.
  AddToStoreNar(w, kNew, nar);
  w.U64(static_cast<uint64_t>(ServeCommand::kDumpStorePath)).String(kHeld);
  const Outcome o = RunSession(farm, w.data());
  ASSERT_TRUE(o.status.ok()) << o.status;
  const std::string expected =
      ServeWriter().U64(kServeMagic2).U64(kServeProtocolVersion).Strings({kHeld}).U64(1).U64(1).Raw(farm.nar).data();
  EXPECT_EQ(o.out, expected);
  ASSERT_EQ(farm.added.size(), 1u);
  EXPECT_EQ(farm.added[kNew], nar);
}

// A builder that builds nothing (a fake): it remembers the request and
// answers "built" with fixed times.
class FakeBuilder final : public DerivationBuilder {
 public:
  absl::StatusOr<ServeBuildResult> Build(const std::string& drv_path, const ServeDerivation& drv,
                                         const ServeBuildOptions& options,
                                         absl::FunctionRef<void(absl::string_view)>) override {
    asked = drv_path;
    got = drv;
    limits = options;
    ServeBuildResult r;
    r.status = ServeBuildStatus::kBuilt;
    r.times_built = 1;
    r.start_time = 100;
    r.stop_time = 102;
    r.built_outputs = ServeBuiltOutputs({{"out", drv.outputs[0].path}});
    return r;
  }
  std::string asked;
  ServeDerivation got;
  ServeBuildOptions limits;
};

// Whole sessions as each client holds them, byte for byte, written out
// field by field from the clients' sources (not with the writers under
// test): Nix 2.3 (serve protocol 2.5), Nix 2.18 (2.7), Nix 2.36 (2.8:
// it speaks the lower of the two versions, so 2.7 here, where the build
// result's outputs are still the "sha256:<zeros>!NAME" map of JSON
// realisations; its 2.8 form — output name to path and signatures — is
// never sent), and Lix (2.7; it encodes with the server's version, not the
// lower, the same here). Each asks for a path's info and builds one
// derivation.
TEST(ServeNixSessionTest, SessionsOfNewerAndOlderClientsAsTheirSourcesLayThemOut) {
  constexpr char kDrv[] = "/nix/store/cccccccccccccccccccccccccccccccc-top.drv";
  constexpr char kOut[] = "/nix/store/dddddddddddddddddddddddddddddddd-top";
  struct Client {
    const char* who;
    uint64_t version;  // What its hello says.
  };
  for (const Client& client :
       {Client{"Nix 2.3", 0x205}, Client{"Nix 2.18", 0x207}, Client{"Nix 2.36", 0x208}, Client{"Lix 2.96", 0x207}}) {
    const uint64_t minor = std::min<uint64_t>(client.version, 0x207) & 0xff;
    ServeWriter in;
    in.U64(0x390c9deb).U64(client.version);
    in.U64(2).U64(1).String(kHeld);  // query-path-infos
    in.U64(8).String(kDrv);          // build-derivation: the BasicDerivation…
    in.U64(1).String("out").String(kOut).String("").String("");
    in.U64(1).String(kHeld).String("x86_64-linux").String("/bin/sh");
    in.U64(2).String("-c").String("echo > $out");
    in.U64(2).String("name").String("top").String("out").String(kOut);
    in.U64(7).U64(3600);        // …then max-silent-time, timeout,
    in.U64(4096);               // max log size (2.2),
    in.U64(0).U64(0);           // repeats and determinism (2.3),
    if (minor >= 7) in.U64(1);  // keep-failed (2.7).

    ServeWriter want;
    want.U64(0x5452eecb).U64(0x207);
    want.String(kHeld).String("").U64(0).U64(19).U64(19);  // deriver, references, download and NAR size
    if (minor >= 4) {
      want.String("sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s").String("").U64(0);
    }
    want.String("");
    want.U64(0).String("");                // Built, no error
    want.U64(1).U64(0).U64(100).U64(102);  // times built, non-deterministic, start, stop (2.3)
    if (minor >= 6) {
      const std::string id = "sha256:0000000000000000000000000000000000000000000000000000000000000000!out";
      want.U64(1).String(id).String(
          absl::StrCat(R"({"id":")", id, R"(","outPath":"dddddddddddddddddddddddddddddddd-top"})"));
    }

    FakeServeFarm farm;
    FakeBuilder builder;
    const Outcome o = RunSession(farm, in.data(), &builder);
    ASSERT_TRUE(o.status.ok()) << client.who << ": " << o.status;
    EXPECT_EQ(o.out, want.data()) << client.who;
    EXPECT_EQ(builder.asked, kDrv) << client.who;
    EXPECT_EQ(builder.got.outputs.size(), 1u) << client.who;
    EXPECT_EQ(builder.got.input_srcs, std::vector<std::string>{kHeld}) << client.who;
    EXPECT_EQ(builder.limits.max_silent_time, 7u) << client.who;
    EXPECT_EQ(builder.limits.build_timeout, 3600u) << client.who;
    EXPECT_EQ(builder.limits.max_log_size, 4096u) << client.who;
    EXPECT_EQ(builder.limits.keep_failed, minor >= 7) << client.who;
  }
}

// What add-multiple-to-store's frames carry for one path, kNew: the count,
// its info (with the path) as the daemon protocol lays it out, its NAR.
std::string DaemonUpload(const std::string& nar) {
  ServeWriter upload;
  upload.U64(1).String(kNew).String("").String(Sha256Hex(nar)).Strings({}).U64(0).U64(nar.size()).U64(0);
  upload.Strings({}).String("").Raw(nar);
  return upload.data();
}

// The daemon protocol (ssh-ng://) through the same session: a Nix 2.8
// client's session (protocol 1.34) byte for byte as its sources
// (remote-store.cc, daemon.cc) lay it out, written field by field.
TEST(ServeNixSessionTest, ADaemonProtocolSessionAsNix28LaysItOut) {
  constexpr char kDrv[] = "/nix/store/cccccccccccccccccccccccccccccccc-top.drv";
  constexpr char kOut[] = "/nix/store/dddddddddddddddddddddddddddddddd-top";
  const std::string nar = testing::NarArchive(testing::NarFile("uploaded\n"));
  ServeWriter in;
  in.U64(0x6e697863).U64(0x122).U64(0).U64(0);  // Hello, version, no CPU pinning, no reserved space.
  in.U64(19);                                   // set-options: twelve numbers (max-silent-time the sixth)…
  for (uint64_t v : {0, 0, 0, 0, 1, 7, 1, 0, 0, 0, 0, 1}) in.U64(v);
  in.U64(1).String("timeout").String("3600");  // …and the overrides.
  in.U64(31).Strings({kHeld, kNew}).U64(0);    // query-valid-paths, no substitution
  in.U64(26).String(kHeld);                    // query-path-info
  // add-multiple-to-store: repair, don't-check-sigs, then frames holding
  // the upload — cut across two frames.
  const std::string u = DaemonUpload(nar);
  in.U64(44).U64(0).U64(1);
  in.U64(10).Raw(u.substr(0, 10)).U64(u.size() - 10).Raw(u.substr(10)).U64(0);
  in.U64(36).String(kDrv);  // build-derivation: the BasicDerivation, the build mode.
  in.U64(1).String("out").String(kOut).String("").String("");
  in.U64(1).String(kHeld).String("x86_64-linux").String("/bin/sh");
  in.U64(2).String("-c").String("echo > $out");
  in.U64(1).String("name").String("top");
  in.U64(0);
  in.U64(38).String(kHeld);  // nar-from-path

  constexpr uint64_t kLast = 0x616c7473;
  ServeWriter want;
  want.U64(0x6478696f).U64(0x122).String("2.8.0 (kiln serve-nix)").U64(kLast);
  want.U64(kLast);
  want.U64(kLast).Strings({kHeld});
  want.U64(kLast).U64(1).String("").String(
      ParseNixHash("sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s")->Base16());
  want.Strings({}).U64(0).U64(19).U64(0).Strings({}).String("");
  want.U64(kLast);
  const std::string id = "sha256:0000000000000000000000000000000000000000000000000000000000000000!out";
  want.U64(kLast).U64(0).String("").U64(1).U64(0).U64(100).U64(102);
  want.U64(1).String(id).String(
      absl::StrCat(R"({"id":")", id, R"(","outPath":"dddddddddddddddddddddddddddddddd-top"})"));
  want.U64(kLast);

  FakeServeFarm farm;
  FakeBuilder builder;
  const Outcome o = RunSession(farm, in.data(), &builder);
  ASSERT_TRUE(o.status.ok()) << o.status;
  EXPECT_EQ(o.out, want.data() + farm.nar);
  ASSERT_EQ(farm.added.size(), 1u);
  EXPECT_EQ(farm.added[kNew], nar);
  EXPECT_EQ(farm.infos[kNew].nar_hash(), "sha256:" + Sha256Hex(nar));
  EXPECT_EQ(builder.asked, kDrv);
  EXPECT_EQ(builder.limits.max_silent_time, 7u);
  EXPECT_EQ(builder.limits.build_timeout, 3600u);
}

TEST(ServeNixSessionTest, BadDaemonProtocolInputIsToldToTheClientAndChangesNothing) {
  const std::string nar = testing::NarArchive(testing::NarFile("x"));
  const auto hello = [] { return std::move(ServeWriter().U64(0x6e697863).U64(0x122).U64(0).U64(0)); };
  const std::string upload = DaemonUpload(nar);
  // An add-multiple-to-store whose one frame holds all but the NAR's last 8
  // bytes.
  const ServeWriter short_upload =
      hello().U64(44).U64(0).U64(0).U64(upload.size() - 8).Raw(upload.substr(0, upload.size() - 8));
  struct Case {
    const char* what;
    std::string input;
    absl::StatusCode code;
    const char* says;
  };
  const std::vector<Case> cases = {
      {"an unknown major version", ServeWriter().U64(0x6e697863).U64(0x222).data(), absl::StatusCode::kInvalidArgument,
       "version 2.34 is not 1.x"},
      {"a client before 1.32", ServeWriter().U64(0x6e697863).U64(0x115).U64(0).U64(0).data(),
       absl::StatusCode::kFailedPrecondition, "use ssh://"},
      {"an unknown operation", hello().U64(77).data(), absl::StatusCode::kUnimplemented, "operation 77"},
      {"an absurd frame", hello().U64(44).U64(0).U64(0).U64(uint64_t{1} << 40).data(),
       absl::StatusCode::kResourceExhausted, "a frame of"},
      {"frames cut short", hello().U64(44).U64(0).U64(0).U64(upload.size()).Raw(upload.substr(0, 40)).data(),
       absl::StatusCode::kDataLoss, ""},
      {"no frame after the last", short_upload.data(), absl::StatusCode::kDataLoss, "ended inside a framed stream"},
      {"a NAR shorter than its size", ServeWriter(short_upload).U64(0).data(), absl::StatusCode::kDataLoss, ""},
      {"a path outside the store", hello().U64(26).String("/etc/passwd").data(), absl::StatusCode::kInvalidArgument,
       "not a store path"},
  };
  for (const Case& c : cases) {
    FakeServeFarm farm;
    const Outcome o = RunSession(farm, c.input);
    EXPECT_EQ(o.status.code(), c.code) << c.what << ": " << o.status;
    EXPECT_TRUE(absl::StrContains(o.status.message(), c.says)) << c.what << ": " << o.status;
    EXPECT_TRUE(farm.added.empty()) << c.what;
    if (c.code != absl::StatusCode::kInvalidArgument || absl::StrContains(c.what, "outside")) {
      // The daemon's error message, for the client to show.
      EXPECT_TRUE(absl::StrContains(o.out, ServeWriter().U64(0x63787470).String("Error").data())) << c.what;
    }
  }
}

TEST(ServeNixSessionTest, BadInputEndsTheSessionAndChangesNothing) {
  const std::string nar = testing::NarArchive(testing::NarFile("x"));
  struct Case {
    const char* what;
    std::string input;
    absl::StatusCode code;
    const char* says;
  };
  ServeWriter truncated = Hello();
  AddToStoreNar(truncated, kNew, nar);
  const std::string cut = truncated.data().substr(0, truncated.data().size() - 5);
  ServeWriter outside = Hello();
  AddToStoreNar(outside, "/etc/passwd", nar);
  const std::vector<Case> cases = {
      {"not the protocol", ServeWriter().U64(12345).data(), absl::StatusCode::kInvalidArgument, "bad hello"},
      {"an unknown major version", ServeWriter().U64(kServeMagic1).U64(0x307).data(),
       absl::StatusCode::kInvalidArgument, "version 3.7"},
      {"an unknown command", Hello().U64(99).data(), absl::StatusCode::kInvalidArgument, "unknown serve command 99"},
      {"a truncated NAR", cut, absl::StatusCode::kDataLoss, "ended"},
      {"an absurd length", Hello().U64(1).U64(0).U64(0).U64(uint64_t{1} << 50).data(),
       absl::StatusCode::kResourceExhausted, "items"},
      {"a path outside the store", outside.data(), absl::StatusCode::kInvalidArgument, "not a store path"},
      {"a relative path", Hello().U64(1).U64(0).U64(0).Strings({"nix/store/x"}).data(),
       absl::StatusCode::kInvalidArgument, "not a store path"},
      {"a build request cut short", Hello().U64(static_cast<uint64_t>(ServeCommand::kBuildDerivation)).data(),
       absl::StatusCode::kDataLoss, "ended"},
      {"a build-paths request cut short", Hello().U64(static_cast<uint64_t>(ServeCommand::kBuildPaths)).data(),
       absl::StatusCode::kDataLoss, "ended"},
      {"import-paths, a bad NAR after a good one", ImportPaths({{kNew, nar}, {kOther, "not a NAR at all, no"}}),
       absl::StatusCode::kDataLoss, "malformed NAR"},
      {"import-paths, no magic after the NAR", Hello().U64(4).U64(1).Raw(nar).U64(0x1234).data(),
       absl::StatusCode::kInvalidArgument, "export magic"},
      {"import-paths, a path outside the store", ImportPaths({{"/tmp/evil", nar}}), absl::StatusCode::kInvalidArgument,
       "not a store path"},
      {"import-paths cut short", ImportPaths({{kNew, nar}}).substr(0, 100), absl::StatusCode::kDataLoss, ""},
  };
  for (const Case& c : cases) {
    FakeServeFarm farm;
    const Outcome o = RunSession(farm, c.input);
    EXPECT_EQ(o.status.code(), c.code) << c.what << ": " << o.status;
    EXPECT_TRUE(absl::StrContains(o.status.message(), c.says)) << c.what << ": " << o.status;
    EXPECT_TRUE(farm.added.empty()) << c.what;
  }
  // The farm's NAR longer than its narinfo says: refused, not passed on whole.
  FakeServeFarm lying;
  lying.claimed_nar_size = 5;
  const Outcome o =
      RunSession(lying, Hello().U64(static_cast<uint64_t>(ServeCommand::kDumpStorePath)).String(kHeld).data());
  EXPECT_TRUE(absl::IsDataLoss(o.status)) << o.status;
}

}  // namespace
}  // namespace kiln
