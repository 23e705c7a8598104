// Workers on private Nix stores share what they build through the farm
// store: worker A builds a derivation and sends it to the farm; worker B,
// on a store of its own, builds something that needs it and substitutes it
// from the farm (through its relay, checked by its Nix against the farm's
// key) instead of building it again. The builder counts its runs in a file
// outside every store.
#include <csignal>

#include <filesystem>
#include <fstream>
#include <string>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "tests/support/local_farm.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

size_t LinesIn(const std::string& file) {
  std::ifstream in(file);
  std::string line;
  size_t n = 0;
  while (std::getline(in, line)) ++n;
  return n;
}

std::string ReadAll(const std::string& file) {
  std::ifstream in(file);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST(FarmSubstitutionE2eTest, BuiltOnWorkerAIsSubstitutedNotBuiltOnWorkerB) {
  testing::LocalFarm farm(/*workers=*/1);
  farm.UsePrivateStores();
  ASSERT_TRUE(farm.Start().ok());
  testing::TempDir work;
  const std::string runs = work.Sub("base-runs");
  // `top` needs and refers to `base`; base's builder counts its runs.
  testing::WriteFileOrDie(work.Sub("svc/flake.nix"), absl::StrCat(R"({
  outputs = { self }: rec {
    packages.x86_64-linux.base = derivation {
      name = "base"; system = "x86_64-linux"; builder = "/bin/sh";
      args = [ "-c" "echo run >> )",
                                                                  runs, R"(; echo base > $out" ];
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
  EXPECT_EQ(LinesIn(runs), 1u);
  const nlohmann::json built_a = nlohmann::json::parse(a->stdout_data);
  const std::string base = built_a[0]["outputs"]["out"].get<std::string>();
  ASSERT_TRUE(absl::StartsWith(base, "/nix/store/")) << a->stdout_data;
  EXPECT_TRUE(absl::StrContains(ReadAll(farm.LogOf("worker-1")) + a->stderr_data, "farm store: sent 1 of 1 path"))
      << a->stderr_data;

  // A leaves; B, a machine of its own with an empty store, builds top.
  farm.KillWorker(0, SIGTERM);
  ASSERT_TRUE(farm.AddWorker().ok());
  absl::StatusOr<CommandResult> b = farm.Kiln({"build", "--json", work.Sub("svc") + "#top"});
  ASSERT_TRUE(b.ok()) << b.status();
  ASSERT_EQ(b->exit.exit_code, 0) << b->stderr_data;
  const nlohmann::json built_b = nlohmann::json::parse(b->stdout_data);
  EXPECT_EQ(built_b[0]["worker"], "worker-2") << b->stdout_data;
  EXPECT_EQ(LinesIn(runs), 1u) << "base was built again on worker B";
  // B's metrics say it: base came from the farm, top went to it.
  absl::StatusOr<std::string> b_metrics = testing::ScrapeMetrics(farm.worker_metrics().at(1));
  ASSERT_TRUE(b_metrics.ok()) << b_metrics.status();
  EXPECT_TRUE(absl::StrContains(*b_metrics, "kiln_worker_farm_narinfo_requests_total{result=\"hit\"} 1")) << *b_metrics;
  EXPECT_FALSE(absl::StrContains(*b_metrics, "kiln_worker_farm_substituted_bytes_total 0\n")) << *b_metrics;
  EXPECT_TRUE(absl::StrContains(*b_metrics, "kiln_worker_farm_uploaded_paths_total 1")) << *b_metrics;

  // B's store has base, signed by the farm: substituted, not built.
  absl::StatusOr<CommandResult> sigs =
      RunCommand(farm.OnWorkerMachine(1, {"nix", "path-info", "--json", "--sigs", base}));
  ASSERT_TRUE(sigs.ok() && sigs->exit.Success()) << (sigs.ok() ? sigs->stderr_data : sigs.status().ToString());
  EXPECT_TRUE(absl::StrContains(sigs->stdout_data, "\"kiln-farm-1:")) << sigs->stdout_data;
  const std::string top = built_b[0]["outputs"]["out"].get<std::string>();
  std::ifstream top_file(farm.StoreDirOf(1) + "/store/" + std::filesystem::path(top).filename().string());
  std::string line;
  std::getline(top_file, line);
  EXPECT_EQ(line, "base top");

  // A laptop with a store of its own: `kiln build -o` realises top from the
  // farm store and links it as a GC root, as nix build -o does.
  const std::string laptop = work.Sub("laptop-nix");
  const auto on_laptop = [&](const std::vector<std::string>& argv) {
    ProcessSpec spec = testing::OnPrivateStore(laptop, argv);
    const ProcessSpec kiln = farm.KilnSpec({});
    spec.extra_env.insert(spec.extra_env.end(), kiln.extra_env.begin(), kiln.extra_env.end());
    absl::StatusOr<CommandResult> r = RunCommand(spec, "", absl::Minutes(2));
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *r : CommandResult{};
  };
  std::vector<std::string> build_o =
      farm.KilnSpec({"build", "--json", work.Sub("svc") + "#top", "-o", work.Sub("result")}).argv;
  CommandResult linked = on_laptop(build_o);
  ASSERT_EQ(linked.exit.exit_code, 0) << linked.stderr_data;
  const nlohmann::json built_o = nlohmann::json::parse(linked.stdout_data);
  EXPECT_EQ(built_o[0]["outLinks"]["out"], work.Sub("result")) << linked.stdout_data;
  EXPECT_EQ(built_o[0]["fetchedPaths"], 2) << linked.stdout_data;  // top and base.
  EXPECT_EQ(std::filesystem::read_symlink(work.Sub("result")).string(), top);
  CommandResult known = on_laptop({"nix", "path-info", "--json", "--sigs", top});
  ASSERT_TRUE(known.exit.Success()) << known.stderr_data;
  EXPECT_TRUE(absl::StrContains(known.stdout_data, "\"kiln-farm-1:")) << known.stdout_data;
  CommandResult roots = on_laptop({"nix-store", "--gc", "--print-roots"});
  EXPECT_TRUE(absl::StrContains(roots.stdout_data, work.Sub("result") + " -> " + top)) << roots.stdout_data;
  EXPECT_EQ(LinesIn(runs), 1u);

  // `kiln copy` into another empty store: the closure of what it names.
  const std::string ci = work.Sub("ci-nix");
  ProcessSpec copy = testing::OnPrivateStore(ci, farm.KilnSpec({"copy", "--json", top}).argv);
  absl::StatusOr<CommandResult> copied = RunCommand(copy, "", absl::Minutes(2));
  ASSERT_TRUE(copied.ok()) << copied.status();
  ASSERT_EQ(copied->exit.exit_code, 0) << copied->stderr_data;
  const nlohmann::json copy_json = nlohmann::json::parse(copied->stdout_data);
  EXPECT_EQ(copy_json["fetched"], 2);
  EXPECT_EQ(copy_json["closure"].size(), 2u);
  absl::StatusOr<CommandResult> valid = RunCommand(testing::OnPrivateStore(ci, {"nix-store", "--verify-path", base}));
  ASSERT_TRUE(valid.ok());
  EXPECT_TRUE(valid->exit.Success()) << valid->stderr_data;
  // A path the farm does not have: a clear error, nothing added.
  ProcessSpec absent =
      testing::OnPrivateStore(ci, farm.KilnSpec({"copy", "/nix/store/00000000000000000000000000000000-absent"}).argv);
  absl::StatusOr<CommandResult> refused = RunCommand(absent, "", absl::Minutes(2));
  ASSERT_TRUE(refused.ok());
  EXPECT_EQ(refused->exit.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(refused->stderr_data, "is not in the farm store")) << refused->stderr_data;
}

// Over --cache-max-gb the farm store collects what the most recent
// buildsets do not need, least recently used first; the metrics say so.
TEST(FarmSubstitutionE2eTest, TheFarmStoreStaysUnderItsLimitAndKeepsTheLatestBuildsets) {
  testing::LocalFarm farm(/*workers=*/1);
  farm.UsePrivateStores();
  // About 100 bytes: room for one small output; each new buildset pushes
  // the older ones out.
  farm.SetCoordinatorFlags({"--cache-max-gb=0.0000001", "--cache-pin-buildsets=1", "--cache-gc-interval=100ms"});
  ASSERT_TRUE(farm.Start().ok());
  testing::TempDir work;
  testing::WriteFileOrDie(work.Sub("svc/flake.nix"), R"({
  outputs = { self }: {
    packages.x86_64-linux.one = derivation {
      name = "one"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo one > $out" ];
    };
    packages.x86_64-linux.two = derivation {
      name = "two"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo two > $out" ];
    };
  };
})");
  std::string out[2];
  const char* attrs[2] = {"one", "two"};
  for (int i = 0; i < 2; ++i) {
    absl::StatusOr<CommandResult> built = farm.Kiln({"build", "--json", work.Sub("svc") + "#" + attrs[i]});
    ASSERT_TRUE(built.ok()) << built.status();
    ASSERT_EQ(built->exit.exit_code, 0) << built->stderr_data;
    out[i] = nlohmann::json::parse(built->stdout_data)[0]["outputs"]["out"].get<std::string>();
  }
  // `one` goes (its buildset is no longer the latest); `two` stays.
  std::string metrics;
  for (const absl::Time give_up = absl::Now() + absl::Seconds(30); absl::Now() < give_up;) {
    absl::StatusOr<std::string> scraped = testing::ScrapeMetrics(farm.coordinator_metrics());
    ASSERT_TRUE(scraped.ok());
    metrics = *scraped;
    if (absl::StrContains(metrics, "kiln_cache_gc_collected_paths_total 1")) break;
    absl::SleepFor(absl::Milliseconds(100));
  }
  EXPECT_TRUE(absl::StrContains(metrics, "kiln_cache_gc_collected_paths_total 1")) << metrics;
  EXPECT_TRUE(absl::StrContains(metrics, "kiln_cache_paths 1")) << metrics;
  EXPECT_TRUE(absl::StrContains(metrics, "kiln_cache_uploaded_paths_total 2")) << metrics;
  const auto copy = [&](const std::string& path) {
    absl::StatusOr<CommandResult> r = RunCommand(
        testing::OnPrivateStore(work.Sub("client-nix"), farm.KilnSpec({"copy", path}).argv), "", absl::Minutes(2));
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *r : CommandResult{};
  };
  CommandResult gone = copy(out[0]);
  EXPECT_EQ(gone.exit.exit_code, 1) << gone.stderr_data;
  EXPECT_TRUE(absl::StrContains(gone.stderr_data, "is not in the farm store")) << gone.stderr_data;
  CommandResult kept = copy(out[1]);
  EXPECT_EQ(kept.exit.exit_code, 0) << kept.stderr_data;
  absl::StatusOr<std::string> after = testing::ScrapeMetrics(farm.coordinator_metrics());
  ASSERT_TRUE(after.ok());
  EXPECT_TRUE(absl::StrContains(*after, "kiln_cache_narinfo_requests_total{client=\"worker\",result=\"hit\"} 1"))
      << *after;
  EXPECT_TRUE(absl::StrContains(*after, "kiln_cache_narinfo_requests_total{client=\"worker\",result=\"miss\"}"))
      << *after;
}

}  // namespace
}  // namespace kiln
