// Fuzz target: a whole `kiln serve-nix` session (cli/serve_nix.h) — what a
// Nix client sends the gateway over SSH — against an in-memory farm store
// (a fake, named so) holding two paths. The session must end with OK or an
// error, never crash, hang or allocate without bound; every NAR it sends
// is a whole one the farm holds. The same bytes also go through the
// build-derivation decoders (derivation, build options, build result).
#include <zstd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>

#include "absl/strings/str_cat.h"
#include "cli/serve_nix.h"
#include "common/narinfo.h"

namespace {

void Check(bool ok) {
  if (!ok) std::abort();
}

constexpr char kBase[] = "/nix/store/bkzaw5a0kf5jbmn7xy370j2l9rgikxjn-base";
constexpr char kTop[] = "/nix/store/mjd1qxbld5xcd5xjpbgq9af4nd8abl13-top";

// Two paths, top referring to base; narinfos as the farm serves them.
class FuzzFarm final : public kiln::FarmStoreClient {
 public:
  FuzzFarm() {
    nar_ = "a NAR's bytes as the farm keeps them";
    compressed_.resize(ZSTD_compressBound(nar_.size()));
    compressed_.resize(ZSTD_compress(compressed_.data(), compressed_.size(), nar_.data(), nar_.size(), 1));
    for (const char* p : {kBase, kTop}) {
      kiln::NarInfo info;
      info.store_path = p;
      info.url = "nar/0000000000000000000000000000000000000000000000000000.nar.zst";
      info.compression = "zstd";
      info.nar_hash = "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";
      info.nar_size = nar_.size();
      if (std::string(p) == kTop) info.references = {"bkzaw5a0kf5jbmn7xy370j2l9rgikxjn-base"};
      infos_[std::string(p).substr(11, 32)] = info.Render();
    }
  }
  absl::StatusOr<std::vector<std::string>> Missing(const std::vector<std::string>& paths) override {
    std::vector<std::string> missing;
    for (const std::string& p : paths) {
      if (p != kBase && p != kTop) missing.push_back(p);
    }
    return missing;
  }
  absl::Status AddPath(const kiln::v1::PathInfo&, absl::FunctionRef<absl::Status(kiln::NarSink)>) override {
    return absl::UnimplementedError("read-only");
  }
  absl::StatusOr<std::string> PublicKey() override { return "k:AAAA"; }
  absl::StatusOr<std::string> NarInfo(const std::string& hash_part) override {
    auto it = infos_.find(hash_part);
    if (it == infos_.end()) return absl::NotFoundError("absent");
    return it->second;
  }
  absl::Status FetchNar(const std::string&, kiln::NarSink sink) override { return sink(compressed_); }

  std::string nar_, compressed_;
  std::map<std::string, std::string> infos_;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static FuzzFarm* farm = new FuzzFarm();
  size_t at = 0;
  kiln::ServeReader in(
      [&](char* buf, size_t want) -> absl::StatusOr<size_t> {
        const size_t n = std::min(want, size - at);
        std::memcpy(buf, data + at, n);
        at += n;
        return n;
      },
      kiln::ServeLimits{.max_string_bytes = 4096, .max_list_items = 64});
  uint64_t out_bytes = 0;
  kiln::ServeSessionReport report;
  (void)kiln::RunServeSession(
      in,
      [&](absl::string_view bytes) {
        out_bytes += bytes.size();
        return absl::OkStatus();
      },
      *farm, &report);
  Check(report.nar_bytes_sent == report.nars_sent * farm->nar_.size());
  // Replies stay proportional to the requests: at most a few KiB each, after
  // a greeting of at most 512 bytes (the daemon protocol's: its version
  // string, and an error message when it refuses the client).
  Check(out_bytes <= 512 + report.commands * (64 * 2048 + 4096));

  // The build-derivation decoders on the same bytes: what decodes encodes
  // back to bytes that decode the same.
  size_t at2 = 0;
  kiln::ServeReader in2(
      [&](char* buf, size_t want) -> absl::StatusOr<size_t> {
        const size_t n = std::min(want, size - at2);
        std::memcpy(buf, data + at2, n);
        at2 += n;
        return n;
      },
      kiln::ServeLimits{.max_string_bytes = 4096, .max_list_items = 64});
  auto drv = kiln::ReadServeDerivation(in2);
  auto options = kiln::ReadServeBuildOptions(in2, kiln::kServeProtocolVersion);
  auto result = kiln::ReadServeBuildResult(in2, kiln::kServeProtocolVersion);
  if (drv.ok() && options.ok() && result.ok()) {
    kiln::ServeWriter w;
    kiln::WriteServeDerivation(w, *drv);
    kiln::WriteServeBuildOptions(w, *options, kiln::kServeProtocolVersion);
    kiln::WriteServeBuildResult(w, *result, kiln::kServeProtocolVersion);
    const std::string bytes = w.data();
    size_t at3 = 0;
    kiln::ServeReader in3([&](char* buf, size_t want) -> absl::StatusOr<size_t> {
      const size_t n = std::min(want, bytes.size() - at3);
      std::memcpy(buf, bytes.data() + at3, n);
      at3 += n;
      return n;
    });
    auto drv2 = kiln::ReadServeDerivation(in3);
    Check(drv2.ok() && drv2->env == drv->env && drv2->args == drv->args && drv2->input_srcs == drv->input_srcs);
    auto options2 = kiln::ReadServeBuildOptions(in3, kiln::kServeProtocolVersion);
    Check(options2.ok() && options2->max_log_size == options->max_log_size);
    auto result2 = kiln::ReadServeBuildResult(in3, kiln::kServeProtocolVersion);
    Check(result2.ok() && result2->error_msg == result->error_msg && result2->built_outputs == result->built_outputs);
  }
  return 0;
}
