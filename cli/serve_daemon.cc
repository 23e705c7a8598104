#include "cli/serve_daemon.h"

#include <algorithm>
#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "cli/serve_build_paths.h"
#include "cli/serve_farm_reads.h"
#include "common/nix_hash.h"
#include "common/status_macros.h"

namespace kiln {
namespace {

// What the daemon sends before an operation's answer.
constexpr uint64_t kStderrNext = 0x6f6c6d67;   // A log line.
constexpr uint64_t kStderrLast = 0x616c7473;   // The answer follows.
constexpr uint64_t kStderrError = 0x63787470;  // The operation failed.

// A frame of a framed stream (an upload's NARs) at most this long.
constexpr uint64_t kMaxFrameBytes = uint64_t{64} << 20;

enum class DaemonOp : uint64_t {
  kIsValidPath = 1,
  kBuildPaths = 9,
  kEnsurePath = 10,
  kAddTempRoot = 11,
  kSetOptions = 19,
  kQueryPathInfo = 26,
  kQueryValidPaths = 31,
  kQueryMissing = 40,
  kBuildDerivation = 36,
  kNarFromPath = 38,
  kAddToStoreNar = 39,
  kAddMultipleToStore = 44,
  kBuildPathsWithResults = 46,
};

// The bytes of a framed stream — frames of a u64 length and that many
// bytes (unpadded), a zero length after the last — read from `in`.
class FramedSource {
 public:
  explicit FramedSource(ServeReader& in) : in_(in) {}

  // Up to `size` bytes; 0 once the stream has ended.
  absl::StatusOr<size_t> Read(char* buf, size_t size) {
    if (ended_) return 0;
    if (left_ == 0) {
      absl::StatusOr<uint64_t> length = in_.U64();
      if (absl::IsOutOfRange(length.status())) return absl::DataLossError("the input ended inside a framed stream");
      RETURN_IF_ERROR(length.status());
      if (*length == 0) {
        ended_ = true;
        return 0;
      }
      if (*length > kMaxFrameBytes) {
        return absl::ResourceExhaustedError(absl::StrCat("a frame of ", *length, " bytes"));
      }
      left_ = *length;
    }
    ASSIGN_OR_RETURN(size_t n, in_.Some(buf, static_cast<size_t>(std::min<uint64_t>(size, left_))));
    left_ -= n;
    return n;
  }

 private:
  ServeReader& in_;
  uint64_t left_ = 0;
  bool ended_ = false;
};

// OK when `framed` has ended (its closing frame read); nothing may follow
// `what`.
absl::Status AtEnd(ServeReader& framed, absl::string_view what) {
  const absl::Status end = framed.U64().status();
  if (end.ok()) return absl::InvalidArgumentError(absl::StrCat("bytes after ", what));
  return absl::IsOutOfRange(end) ? absl::OkStatus() : end;
}

class DaemonSession {
 public:
  DaemonSession(ServeReader& in, absl::FunctionRef<absl::Status(absl::string_view)> out, FarmStoreClient& farm,
                ServeSessionReport& report, DerivationBuilder* builder)
      : in_(in), out_(out), farm_(farm), report_(report), builder_(builder) {}

  absl::Status Run() {
    RETURN_IF_ERROR(Send(ServeWriter().U64(kDaemonMagic2).U64(kDaemonProtocolVersion)));
    ASSIGN_OR_RETURN(report_.client_version, in_.U64());
    const uint64_t client = report_.client_version;
    if ((client & 0xff00) != 0x100) {
      return absl::InvalidArgumentError(
          absl::StrCat("daemon protocol version ", client >> 8, ".", client & 0xff, " is not 1.x"));
    }
    minor_ = std::min(client, kDaemonProtocolVersion) & 0xff;
    if (minor_ >= 14) {
      ASSIGN_OR_RETURN(uint64_t pin_cpu, in_.U64());
      if (pin_cpu != 0) RETURN_IF_ERROR(in_.U64().status());
    }
    if (minor_ >= 11) RETURN_IF_ERROR(in_.U64().status());  // Reserve space: the farm's concern.
    if (minor_ >= 33) RETURN_IF_ERROR(Send(ServeWriter().String("2.8.0 (kiln serve-nix)")));
    if (minor_ < 32) {
      return Fail(absl::FailedPreconditionError(
          absl::StrCat("kiln serve-nix speaks the daemon protocol (ssh-ng://) from version 1.32 (Nix 2.4); this "
                       "client speaks 1.",
                       minor_, ": use ssh:// instead")));
    }
    RETURN_IF_ERROR(Send(ServeWriter().U64(kStderrLast)));
    for (;;) {
      absl::StatusOr<uint64_t> op = in_.U64();
      if (absl::IsOutOfRange(op.status())) return absl::OkStatus();
      RETURN_IF_ERROR(op.status());
      ++report_.commands;
      // The client is told why; the session ends (its stream may be
      // anywhere inside the request).
      if (absl::Status s = Serve(static_cast<DaemonOp>(*op)); !s.ok()) return Fail(s);
    }
  }

 private:
  absl::Status Send(const ServeWriter& w) { return out_(w.data()); }

  // The daemon's error message (its layout since 1.26), then `status`.
  absl::Status Fail(const absl::Status& status) {
    ServeWriter w;
    w.U64(kStderrError).String("Error").U64(0).String("Error").String(absl::StrCat("kiln: ", status.message()));
    w.U64(0).U64(0);  // No position, no traces.
    (void)Send(w);
    return status;
  }

  absl::StatusOr<std::string> StorePath() {
    ASSIGN_OR_RETURN(std::string path, in_.String());
    RETURN_IF_ERROR(CheckStorePath(path));
    return path;
  }

  absl::Status Serve(DaemonOp op) {
    switch (op) {
      case DaemonOp::kSetOptions: return SetOptions();
      case DaemonOp::kIsValidPath: return IsValidPath();
      case DaemonOp::kQueryValidPaths: return QueryValidPaths();
      case DaemonOp::kQueryPathInfo: return QueryPathInfo();
      case DaemonOp::kNarFromPath: return NarFromPath();
      case DaemonOp::kAddToStoreNar: return AddToStoreNar();
      case DaemonOp::kAddMultipleToStore: return AddMultipleToStore();
      case DaemonOp::kBuildDerivation: return BuildDerivation();
      case DaemonOp::kQueryMissing: return QueryMissing();
      case DaemonOp::kBuildPaths: return BuildPaths(/*with_results=*/false);
      case DaemonOp::kBuildPathsWithResults: return BuildPaths(/*with_results=*/true);
      case DaemonOp::kAddTempRoot: {
        // The farm store's collection keeps what buildsets need; a client's
        // temporary root has nothing to add.
        RETURN_IF_ERROR(StorePath().status());
        return Send(ServeWriter().U64(kStderrLast).U64(1));
      }
      case DaemonOp::kEnsurePath: {
        ASSIGN_OR_RETURN(std::string path, StorePath());
        ASSIGN_OR_RETURN(std::vector<std::string> missing, farm_.Missing({path}));
        if (!missing.empty()) return absl::NotFoundError(absl::StrCat("path '", path, "' is not in the farm store"));
        return Send(ServeWriter().U64(kStderrLast).U64(1));
      }
    }
    return absl::UnimplementedError(
        absl::StrCat("daemon operation ", static_cast<uint64_t>(op), " is not served by the farm's gateway"));
  }

  absl::Status SetOptions() {
    // keepFailed, keepGoing, tryFallback, verbosity, maxBuildJobs,
    // maxSilentTime, useBuildHook, verboseBuild, logType, printBuildTrace,
    // buildCores, useSubstitutes.
    uint64_t fields[12];
    for (uint64_t& f : fields) {
      ASSIGN_OR_RETURN(f, in_.U64());
    }
    options_.max_silent_time = fields[5];
    ASSIGN_OR_RETURN(uint64_t overrides, in_.U64());
    if (overrides > ServeLimits{}.max_list_items) return absl::ResourceExhaustedError("too many option overrides");
    for (uint64_t i = 0; i < overrides; ++i) {
      ASSIGN_OR_RETURN(std::string name, in_.String());
      ASSIGN_OR_RETURN(std::string value, in_.String());
      uint64_t n = 0;
      if (!absl::SimpleAtoi(value, &n)) continue;
      if (name == "timeout") options_.build_timeout = n;
      if (name == "max-silent-time") options_.max_silent_time = n;
      if (name == "max-log-size") options_.max_log_size = n;
    }
    return Send(ServeWriter().U64(kStderrLast));
  }

  absl::Status IsValidPath() {
    ASSIGN_OR_RETURN(std::string path, StorePath());
    ASSIGN_OR_RETURN(std::vector<std::string> missing, farm_.Missing({path}));
    return Send(ServeWriter().U64(kStderrLast).U64(missing.empty() ? 1 : 0));
  }

  absl::Status QueryValidPaths() {
    ASSIGN_OR_RETURN(std::vector<std::string> paths, ReadStorePaths(in_));
    if (minor_ >= 27) RETURN_IF_ERROR(in_.U64().status());  // Substitute: the farm substitutes from nowhere.
    std::vector<std::string> valid;
    if (!paths.empty()) {
      ASSIGN_OR_RETURN(std::vector<std::string> missing, farm_.Missing(paths));
      const absl::flat_hash_set<std::string> absent(missing.begin(), missing.end());
      for (std::string& p : paths) {
        if (!absent.contains(p)) valid.push_back(std::move(p));
      }
    }
    return Send(ServeWriter().U64(kStderrLast).Strings(valid));
  }

  // What building `targets` would take, as the farm sees it: a path it
  // holds takes nothing, one it lacks is unknown (it substitutes from
  // nowhere), a derivation ("DRV!OUTPUTS") would be built.
  absl::Status QueryMissing() {
    ASSIGN_OR_RETURN(std::vector<std::string> targets, in_.Strings());
    std::vector<std::string> will_build, paths;
    for (const std::string& t : targets) {
      const std::string path = t.substr(0, t.find('!'));
      RETURN_IF_ERROR(CheckStorePath(path));
      (t.find('!') != std::string::npos ? will_build : paths).push_back(path);
    }
    std::vector<std::string> unknown;
    if (!paths.empty()) {
      ASSIGN_OR_RETURN(unknown, farm_.Missing(paths));
    }
    return Send(ServeWriter().U64(kStderrLast).Strings(will_build).Strings({}).Strings(unknown).U64(0).U64(0));
  }

  absl::Status QueryPathInfo() {
    ASSIGN_OR_RETURN(std::string path, StorePath());
    absl::StatusOr<NarInfo> info = FarmPathInfo(farm_, path);
    if (absl::IsNotFound(info.status())) return Send(ServeWriter().U64(kStderrLast).U64(0));
    RETURN_IF_ERROR(info.status());
    ASSIGN_OR_RETURN(NixHash nar_hash, ParseNixHash(info->nar_hash));
    std::vector<std::string> refs;
    for (const std::string& r : info->references) refs.push_back(FullStorePath(r));
    ServeWriter w;
    w.U64(kStderrLast).U64(1);
    w.String(FullStorePath(info->deriver)).String(nar_hash.Base16()).Strings(refs);
    w.U64(0).U64(info->nar_size);                   // Registration time (unknown), NAR size.
    w.U64(0).Strings(info->sigs).String(info->ca);  // Not ultimate: the farm's signature is what counts.
    return Send(w);
  }

  absl::Status NarFromPath() {
    ASSIGN_OR_RETURN(std::string path, StorePath());
    ASSIGN_OR_RETURN(NarInfo info, FarmPathInfo(farm_, path));
    RETURN_IF_ERROR(Send(ServeWriter().U64(kStderrLast)));
    // After the answer's start, a failure can only end the session.
    RETURN_IF_ERROR(StreamFarmNar(farm_, info, out_));
    ++report_.nars_sent;
    report_.nar_bytes_sent += info.nar_size;
    return absl::OkStatus();
  }

  // A path's info as the daemon protocol lays it out (with the path),
  // from `in`; its NAR follows.
  static absl::StatusOr<kiln::v1::PathInfo> ReadPathInfo(ServeReader& in) {
    kiln::v1::PathInfo info;
    ASSIGN_OR_RETURN(*info.mutable_store_path(), in.String());
    RETURN_IF_ERROR(CheckStorePath(info.store_path()));
    ASSIGN_OR_RETURN(*info.mutable_deriver(), in.String());
    if (!info.deriver().empty()) RETURN_IF_ERROR(CheckStorePath(info.deriver()));
    ASSIGN_OR_RETURN(std::string nar_hash, in.String());
    ASSIGN_OR_RETURN(NixHash parsed, ParseNixHash(nar_hash, HashAlgo::kSha256));
    info.set_nar_hash(absl::StrCat("sha256:", parsed.Base16()));
    ASSIGN_OR_RETURN(std::vector<std::string> refs, ReadStorePaths(in));
    for (std::string& r : refs) info.add_references(std::move(r));
    RETURN_IF_ERROR(in.U64().status());  // Registration time.
    ASSIGN_OR_RETURN(uint64_t nar_size, in.U64());
    if (nar_size == 0) return absl::InvalidArgumentError("a path without its NAR's size");
    info.set_nar_size(nar_size);
    RETURN_IF_ERROR(in.U64().status());      // Ultimate: the farm's signature is what clients trust.
    RETURN_IF_ERROR(in.Strings().status());  // Signatures: likewise.
    ASSIGN_OR_RETURN(*info.mutable_ca(), in.String());
    return info;
  }

  absl::Status AddPath(const kiln::v1::PathInfo& info, ServeReader& in) {
    RETURN_IF_ERROR(AddFarmPathFrom(farm_, info, in));
    ++report_.paths_added;
    return absl::OkStatus();
  }

  absl::Status AddToStoreNar() {
    ASSIGN_OR_RETURN(kiln::v1::PathInfo info, ReadPathInfo(in_));
    RETURN_IF_ERROR(in_.U64().status());  // Repair.
    RETURN_IF_ERROR(in_.U64().status());  // Don't check signatures.
    FramedSource frames(in_);
    ServeReader framed([&frames](char* buf, size_t size) { return frames.Read(buf, size); });
    RETURN_IF_ERROR(AddPath(info, framed));
    RETURN_IF_ERROR(AtEnd(framed, "the NAR"));
    return Send(ServeWriter().U64(kStderrLast));
  }

  absl::Status AddMultipleToStore() {
    RETURN_IF_ERROR(in_.U64().status());  // Repair.
    RETURN_IF_ERROR(in_.U64().status());  // Don't check signatures.
    FramedSource frames(in_);
    ServeReader framed([&frames](char* buf, size_t size) { return frames.Read(buf, size); });
    ASSIGN_OR_RETURN(uint64_t count, framed.U64());
    if (count > ServeLimits{}.max_list_items) return absl::ResourceExhaustedError("too many paths in one upload");
    for (uint64_t i = 0; i < count; ++i) {
      ASSIGN_OR_RETURN(kiln::v1::PathInfo info, ReadPathInfo(framed));
      RETURN_IF_ERROR(AddPath(info, framed));
    }
    RETURN_IF_ERROR(AtEnd(framed, "the last NAR"));
    return Send(ServeWriter().U64(kStderrLast));
  }

  // Paths to make valid in the farm store, derivations built there with
  // their closures (cli/serve_build_paths.h; what `nix copy --from` and
  // `nix build --store ssh-ng://…` ask). One result per target, in the
  // daemon's layout; a failure is the first one met.
  absl::Status BuildPaths(bool with_results) {
    ASSIGN_OR_RETURN(std::vector<std::string> targets, in_.Strings());
    RETURN_IF_ERROR(in_.U64().status());  // Build mode.
    if (builder_ == nullptr) return absl::UnimplementedError("kiln serve-nix does not build here");
    absl::Status log_sent;
    ASSIGN_OR_RETURN(ServeBuildResult result,
                     BuildPathsOnFarm(farm_, *builder_, targets, options_, [&](absl::string_view line) {
                       if (log_sent.ok()) {
                         log_sent = Send(ServeWriter().U64(kStderrNext).String(absl::StrCat(line, "\n")));
                       }
                     }));
    RETURN_IF_ERROR(log_sent);
    const bool ok = ServeBuildSucceeded(result.status);
    if (!ok && !with_results) return absl::AbortedError(result.error_msg);
    ServeWriter w;
    w.U64(kStderrLast);
    if (!with_results) return Send(w.U64(1));
    w.U64(targets.size());
    for (const std::string& t : targets) {
      const bool derivation = t.find('!') != std::string::npos;
      w.String(t).U64(static_cast<uint64_t>(derivation || !ok ? result.status : ServeBuildStatus::kAlreadyValid));
      w.String(result.error_msg).U64(derivation ? result.times_built : 0).U64(0);
      w.U64(result.start_time).U64(result.stop_time).U64(0);  // No realisations: input-addressed outputs.
    }
    return Send(w);
  }

  absl::Status BuildDerivation() {
    ASSIGN_OR_RETURN(std::string drv_path, StorePath());
    ASSIGN_OR_RETURN(ServeDerivation drv, ReadServeDerivation(in_));
    RETURN_IF_ERROR(in_.U64().status());  // Build mode: a farm job builds normally.
    if (builder_ == nullptr) return absl::UnimplementedError("kiln serve-nix does not build here");
    for (const std::string& p : drv.input_srcs) RETURN_IF_ERROR(CheckStorePath(p));
    absl::Status log_sent;
    const ServeBuildResult result =
        ResultForClient(builder_->Build(drv_path, drv, options_, [&](absl::string_view line) {
          if (log_sent.ok()) log_sent = Send(ServeWriter().U64(kStderrNext).String(absl::StrCat(line, "\n")));
        }));
    RETURN_IF_ERROR(log_sent);
    ++report_.derivations_built;
    ServeWriter w;
    w.U64(kStderrLast).U64(static_cast<uint64_t>(result.status)).String(result.error_msg);
    if (minor_ >= 29) {
      w.U64(result.times_built).U64(result.non_deterministic ? 1 : 0).U64(result.start_time).U64(result.stop_time);
    }
    if (minor_ >= 28) {
      w.U64(result.built_outputs.size());
      for (const auto& [id, realisation] : result.built_outputs) w.String(id).String(realisation);
    }
    return Send(w);
  }

  ServeReader& in_;
  absl::FunctionRef<absl::Status(absl::string_view)> out_;
  FarmStoreClient& farm_;
  ServeSessionReport& report_;
  DerivationBuilder* const builder_;
  uint64_t minor_ = 0;
  ServeBuildOptions options_;  // From set-options.
};

}  // namespace

absl::Status RunDaemonSession(ServeReader& in, absl::FunctionRef<absl::Status(absl::string_view)> out,
                              FarmStoreClient& farm, ServeSessionReport& report, DerivationBuilder* builder) {
  return DaemonSession(in, out, farm, report, builder).Run();
}

}  // namespace kiln
