// The farm store in an S3 bucket (moto on 127.0.0.1 standing in for
// Scaleway Object Storage): workers on private stores put what they build
// straight into the bucket with presigned URLs (the coordinator's metrics
// say the bytes did not pass through it), a second worker substitutes
// instead of building, a stock Nix client substitutes from the bucket's own
// HTTP endpoint (signatures checked by Nix), and `kiln copy` fetches through
// the coordinator.
//
// moto does not check the signatures of presigned URLs (nor, in this mode,
// of other requests): the signing is proved against AWS's published example
// and against moto with signatures checked in coordinator/object_store_test.
#include <csignal>

#include <filesystem>
#include <fstream>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "tests/support/local_farm.h"
#include "tests/support/local_s3.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

size_t RunsIn(const std::string& file) {
  std::ifstream in(file);
  std::string line;
  size_t n = 0;
  while (std::getline(in, line)) ++n;
  return n;
}

// The value of an unlabelled metric line "NAME VALUE", or -1.
double MetricValue(const std::string& text, const std::string& name) {
  const std::string prefix = name + " ";
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (absl::ConsumePrefix(&line, prefix)) {
      double v = -1;
      if (absl::SimpleAtod(line, &v)) return v;
    }
  }
  return -1;
}

TEST(FarmObjectStorageE2eTest, WorkersShareThroughABucketThatNixReadsDirectly) {
  absl::StatusOr<std::unique_ptr<testing::LocalS3>> s3 = testing::LocalS3::Start({});
  ASSERT_TRUE(s3.ok()) << s3.status();
  testing::LocalFarm farm(/*workers=*/1);
  farm.UsePrivateStores();
  farm.SetCoordinatorFlags({"--cache-store=" + (*s3)->StoreUri(),
                            "--cache-s3-credentials-file=" + (*s3)->CredentialsFile(), "--cache-listen=127.0.0.1:0"});
  ASSERT_TRUE(farm.Start().ok());
  testing::TempDir work;
  const std::string runs = work.Sub("base-runs");
  testing::WriteFileOrDie(work.Sub("svc/flake.nix"), absl::StrCat(R"({
  outputs = { self }: rec {
    packages.x86_64-linux.base = derivation {
      name = "base"; system = "x86_64-linux"; builder = "/bin/sh";
      args = [ "-c" "echo run >> )",
                                                                  runs, R"(; echo base-in-a-bucket > $out" ];
    };
    packages.x86_64-linux.top = derivation {
      name = "top"; system = "x86_64-linux"; builder = "/bin/sh";
      base = packages.x86_64-linux.base;
      args = [ "-c" "read line < $base; { echo $line top; echo $base; } > $out" ];
    };
  };
})"));
  absl::StatusOr<CommandResult> a = farm.Kiln({"build", "--json", work.Sub("svc") + "#base"});
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_EQ(a->exit.exit_code, 0) << a->stderr_data;
  const std::string base = nlohmann::json::parse(a->stdout_data)[0]["outputs"]["out"].get<std::string>();
  EXPECT_EQ(RunsIn(runs), 1u);

  // Worker A leaves; B, with an empty store of its own, builds top.
  farm.KillWorker(0, SIGTERM);
  ASSERT_TRUE(farm.AddWorker().ok());
  absl::StatusOr<CommandResult> b = farm.Kiln({"build", "--json", work.Sub("svc") + "#top"});
  ASSERT_TRUE(b.ok()) << b.status();
  ASSERT_EQ(b->exit.exit_code, 0) << b->stderr_data;
  const nlohmann::json built_b = nlohmann::json::parse(b->stdout_data);
  EXPECT_EQ(built_b[0]["worker"], "worker-2");
  EXPECT_EQ(RunsIn(runs), 1u) << "base was built again on worker B";
  const std::string top = built_b[0]["outputs"]["out"].get<std::string>();

  // Both uploads went straight to the bucket; B's Nix was sent there for
  // base's NAR.
  absl::StatusOr<std::string> metrics = testing::ScrapeMetrics(farm.coordinator_metrics());
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  EXPECT_EQ(MetricValue(*metrics, "kiln_cache_direct_uploads_total"), 2) << *metrics;
  EXPECT_EQ(MetricValue(*metrics, "kiln_cache_uploaded_paths_total"), 2) << *metrics;
  EXPECT_GE(MetricValue(*metrics, "kiln_cache_nar_redirects_total{client=\"worker\"}"), 1) << *metrics;
  EXPECT_EQ(MetricValue(*metrics, "kiln_cache_served_bytes_total{client=\"worker\"}"), 0) << *metrics;
  absl::StatusOr<CommandResult> sigs = RunCommand(farm.OnWorkerMachine(1, {"nix", "path-info", "--sigs", base}));
  ASSERT_TRUE(sigs.ok() && sigs->exit.Success()) << (sigs.ok() ? sigs->stderr_data : sigs.status().ToString());
  EXPECT_TRUE(absl::StrContains(sigs->stdout_data, "kiln-farm-1:")) << sigs->stdout_data;

  // A stock Nix client reads the bucket itself, as a binary cache.
  absl::StatusOr<CommandResult> key = RunCommand({.argv = {testing::BinPath("kiln-coordinator"), "cache", "public-key",
                                                           "--state-dir=" + farm.dir().Sub("coordinator")},
                                                  .extra_env = {},
                                                  .cwd = ""});
  ASSERT_TRUE(key.ok() && key->exit.Success());
  const std::string public_key(absl::StripAsciiWhitespace(key->stdout_data));
  const std::string laptop = work.Sub("laptop-nix");
  absl::StatusOr<CommandResult> direct =
      RunCommand(testing::OnPrivateStore(laptop, {"nix-store", "--realise", top, "--option", "substituters",
                                                  (*s3)->BucketUrl(), "--option", "trusted-public-keys", public_key}),
                 "", absl::Minutes(2));
  ASSERT_TRUE(direct.ok()) << direct.status();
  ASSERT_TRUE(direct->exit.Success()) << direct->stderr_data;
  absl::StatusOr<CommandResult> verified =
      RunCommand(testing::OnPrivateStore(laptop, {"nix-store", "--verify-path", base}));
  ASSERT_TRUE(verified.ok());
  EXPECT_TRUE(verified->exit.Success()) << verified->stderr_data;
  // A client that does not trust the key gets nothing from the bucket.
  absl::StatusOr<CommandResult> distrusted = RunCommand(
      testing::OnPrivateStore(work.Sub("distrusting-nix"), {"nix-store", "--realise", top, "--option", "substituters",
                                                            (*s3)->BucketUrl(), "--option", "trusted-public-keys",
                                                            "other:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}),
      "", absl::Minutes(2));
  ASSERT_TRUE(distrusted.ok());
  EXPECT_FALSE(distrusted->exit.Success());

  // Through the coordinator's own cache listener the NARs redirect to the
  // bucket; `kiln copy` (which cannot follow a URL) gets the bytes relayed.
  absl::StatusOr<CommandResult> via_cache =
      RunCommand(testing::OnPrivateStore(work.Sub("cache-nix"), {"nix-store", "--realise", top, "--option",
                                                                 "substituters", "http://" + farm.cache_address(),
                                                                 "--option", "trusted-public-keys", public_key}),
                 "", absl::Minutes(2));
  ASSERT_TRUE(via_cache.ok());
  EXPECT_TRUE(via_cache->exit.Success()) << via_cache->stderr_data;
  ProcessSpec copy = testing::OnPrivateStore(work.Sub("ci-nix"), farm.KilnSpec({"copy", "--json", top}).argv);
  absl::StatusOr<CommandResult> copied = RunCommand(copy, "", absl::Minutes(2));
  ASSERT_TRUE(copied.ok()) << copied.status();
  ASSERT_EQ(copied->exit.exit_code, 0) << copied->stderr_data;
  EXPECT_EQ(nlohmann::json::parse(copied->stdout_data)["fetched"], 2);
  EXPECT_EQ(RunsIn(runs), 1u);
}

}  // namespace
}  // namespace kiln
