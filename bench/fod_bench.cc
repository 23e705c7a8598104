// kiln-fod-bench: fills a coordinator's FOD cache with N entries (through
// ImportFods, in batches) and measures CheckFods latency over real gRPC on
// loopback: one call per lookup, each asking for `--batch` FODs, half known
// keys and half unknown. Prints name=value lines.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/digest.h"
#include "common/grpc_util.h"
#include "common/nix_hash.h"
#include "kiln/v1/fod.grpc.pb.h"

ABSL_FLAG(std::string, coordinator, "127.0.0.1:7600", "Coordinator address");
ABSL_FLAG(int, entries, 1000000, "Entries to import first");
ABSL_FLAG(int, lookups, 20000, "CheckFods calls to time (bounded)");
ABSL_FLAG(int, batch, 1, "FODs per CheckFods call");
ABSL_FLAG(int, max_seconds, 120, "Stop the lookups after this long");

namespace {

std::string KeyOf(int i) { return kiln::Sha256Hex(absl::StrCat("bench-fod-", i)); }

std::string HashOf(int i) {
  kiln::NixHash h;
  h.bytes = absl::HexStringToBytes(kiln::Sha256Hex(absl::StrCat("bench-out-", i)));
  return h.Sri();
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  auto stub = kiln::v1::FodService::NewStub(kiln::MakeChannel(absl::GetFlag(FLAGS_coordinator)));
  const int entries = absl::GetFlag(FLAGS_entries);

  const absl::Time fill_start = absl::Now();
  constexpr int kImportBatch = 20000;
  for (int start = 0; start < entries; start += kImportBatch) {
    kiln::v1::ImportFodsRequest request;
    for (int i = start; i < std::min(entries, start + kImportBatch); ++i) {
      kiln::v1::FodEntry* e = request.add_entries();
      e->set_key(KeyOf(i));
      e->set_name(absl::StrCat("dep-", i % 5000));
      e->set_hash(HashOf(i));
      e->set_algo("sha256");
      e->set_mode("recursive");
      e->set_build_seconds(30);
    }
    grpc::ClientContext context;
    kiln::v1::ImportFodsResponse response;
    grpc::Status s = stub->ImportFods(&context, request, &response);
    if (!s.ok()) {
      std::fprintf(stderr, "import failed: %s\n", s.error_message().c_str());
      return 1;
    }
  }
  const double fill_s = absl::ToDoubleSeconds(absl::Now() - fill_start);

  std::mt19937 rng(42);
  std::uniform_int_distribution<int> pick(0, std::max(0, entries - 1));
  const int batch = std::max(1, absl::GetFlag(FLAGS_batch));
  const absl::Time deadline = absl::Now() + absl::Seconds(absl::GetFlag(FLAGS_max_seconds));
  std::vector<double> micros;
  int hits = 0;
  for (int n = 0; n < absl::GetFlag(FLAGS_lookups) && absl::Now() < deadline; ++n) {
    kiln::v1::CheckFodsRequest request;
    for (int b = 0; b < batch; ++b) {
      kiln::v1::FodRef* ref = request.add_fods();
      const int i = pick(rng);
      // Half known keys (declared hash right), half never seen.
      const bool known = (n + b) % 2 == 0;
      ref->set_key(known ? KeyOf(i) : kiln::Sha256Hex(absl::StrCat("unknown-", n, "-", b)));
      ref->set_name(absl::StrCat("dep-", i % 5000));
      ref->set_declared(HashOf(i));
      ref->set_algo("sha256");
      ref->set_mode("recursive");
    }
    grpc::ClientContext context;
    kiln::v1::CheckFodsResponse response;
    const auto t0 = std::chrono::steady_clock::now();
    grpc::Status s = stub->CheckFods(&context, request, &response);
    const auto t1 = std::chrono::steady_clock::now();
    if (!s.ok()) {
      std::fprintf(stderr, "lookup failed: %s\n", s.error_message().c_str());
      return 1;
    }
    for (const auto& v : response.verdicts()) hits += v.kind() == kiln::v1::FodVerdict::KIND_RIGHT;
    micros.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
  }
  std::sort(micros.begin(), micros.end());
  const auto pct = [&](double p) {
    return micros.empty() ? 0.0 : micros[std::min(micros.size() - 1, static_cast<size_t>(p * micros.size()))];
  };
  std::printf("fod_cache_entries=%d\n", entries);
  std::printf("fod_fill_seconds=%.1f\n", fill_s);
  std::printf("fod_lookup_calls=%zu\n", micros.size());
  std::printf("fod_lookup_batch=%d\n", batch);
  std::printf("fod_lookup_hits=%d\n", hits);
  std::printf("fod_lookup_p50_us=%.0f\n", pct(0.50));
  std::printf("fod_lookup_p99_us=%.0f\n", pct(0.99));
  return 0;
}
