#include "cli/serve_nix.h"

#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>

#include <memory>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "cli/cli.h"
#include "cli/client.h"
#include "cli/farm_derivation_builder.h"
#include "cli/serve_build_paths.h"
#include "cli/serve_daemon.h"
#include "cli/serve_farm_reads.h"
#include "common/nar.h"
#include "common/exit_codes.h"
#include "common/narinfo.h"
#include "common/status_macros.h"

namespace kiln {
namespace {

// A build's log line, to the session's stderr: Nix shows it as the log.
void LogToStderr(absl::string_view line) { std::fprintf(stderr, "%.*s\n", static_cast<int>(line.size()), line.data()); }

class Session {
 public:
  Session(ServeReader& in, absl::FunctionRef<absl::Status(absl::string_view)> out, FarmStoreClient& farm,
          ServeSessionReport& report, DerivationBuilder* builder)
      : in_(in), out_(out), farm_(farm), report_(report), builder_(builder) {}

  absl::Status Run() {
    absl::StatusOr<uint64_t> magic = in_.U64();
    if (absl::IsOutOfRange(magic.status())) return absl::OkStatus();  // Connected and left.
    RETURN_IF_ERROR(magic.status());
    // ssh-ng:// clients (`nix-daemon --stdio`'s protocol) through the same
    // forced command.
    if (*magic == kDaemonMagic1) return RunDaemonSession(in_, out_, farm_, report_, builder_);
    if (*magic != kServeMagic1) return absl::InvalidArgumentError("not Nix's serve protocol (bad hello)");
    RETURN_IF_ERROR(Send(ServeWriter().U64(kServeMagic2).U64(kServeProtocolVersion)));
    ASSIGN_OR_RETURN(report_.client_version, in_.U64());
    if (ServeMajor(report_.client_version) != 0x200) {
      return absl::InvalidArgumentError(absl::StrCat("serve protocol version ", report_.client_version >> 8, ".",
                                                     ServeMinor(report_.client_version), " is not 2.x"));
    }
    for (;;) {
      absl::StatusOr<uint64_t> command = in_.U64();
      if (absl::IsOutOfRange(command.status())) return absl::OkStatus();
      RETURN_IF_ERROR(command.status());
      ++report_.commands;
      RETURN_IF_ERROR(Serve(static_cast<ServeCommand>(*command)));
    }
  }

 private:
  absl::Status Send(const ServeWriter& w) { return out_(w.data()); }

  absl::StatusOr<std::vector<std::string>> StorePaths() { return ReadStorePaths(in_); }

  absl::Status Serve(ServeCommand command) {
    switch (command) {
      case ServeCommand::kQueryValidPaths: return QueryValidPaths();
      case ServeCommand::kQueryPathInfos: return QueryPathInfos();
      case ServeCommand::kDumpStorePath: return DumpStorePath();
      case ServeCommand::kQueryClosure: return QueryClosure();
      case ServeCommand::kAddToStoreNar: return AddToStoreNar();
      case ServeCommand::kImportPaths: return ImportPaths();
      case ServeCommand::kBuildDerivation: return BuildDerivation();
      case ServeCommand::kBuildPaths: return BuildPaths();
      case ServeCommand::kExportPaths:
        return absl::UnimplementedError("export-paths is obsolete (Nix uses dump-store-path)");
    }
    return absl::InvalidArgumentError(absl::StrCat("unknown serve command ", static_cast<uint64_t>(command)));
  }

  absl::Status QueryValidPaths() {
    ASSIGN_OR_RETURN(uint64_t lock, in_.U64());
    ASSIGN_OR_RETURN(uint64_t substitute, in_.U64());
    (void)lock;        // Nothing the farm holds goes before its collection rules say.
    (void)substitute;  // The farm store substitutes from nowhere else.
    ASSIGN_OR_RETURN(std::vector<std::string> paths, StorePaths());
    std::vector<std::string> valid;
    if (!paths.empty()) {
      ASSIGN_OR_RETURN(std::vector<std::string> missing, farm_.Missing(paths));
      const absl::flat_hash_set<std::string> absent(missing.begin(), missing.end());
      for (std::string& p : paths) {
        if (!absent.contains(p)) valid.push_back(std::move(p));
      }
    }
    return Send(ServeWriter().Strings(valid));
  }

  absl::Status QueryPathInfos() {
    ASSIGN_OR_RETURN(std::vector<std::string> paths, StorePaths());
    ServeWriter w;
    for (const std::string& path : paths) {
      absl::StatusOr<NarInfo> info = FarmPathInfo(farm_, path);
      if (absl::IsNotFound(info.status())) continue;  // Absent paths are left out.
      RETURN_IF_ERROR(info.status());
      std::vector<std::string> refs;
      for (const std::string& r : info->references) refs.push_back(FullStorePath(r));
      w.String(info->store_path).String(FullStorePath(info->deriver)).Strings(refs);
      w.U64(info->nar_size).U64(info->nar_size);  // Download size, as nix-store --serve says: the NAR's.
      if (ServeMinor(report_.client_version) >= 4) {
        w.String(info->nar_hash).String(info->ca).Strings(info->sigs);
      }
    }
    w.String("");
    return Send(w);
  }

  // The NAR, decompressed from the farm's zstd file as it arrives.
  absl::Status DumpStorePath() {
    ASSIGN_OR_RETURN(std::string path, in_.String());
    ASSIGN_OR_RETURN(NarInfo info, FarmPathInfo(farm_, path));
    RETURN_IF_ERROR(StreamFarmNar(farm_, info, out_));
    ++report_.nars_sent;
    report_.nar_bytes_sent += info.nar_size;
    return absl::OkStatus();
  }

  // A path the client has and the farm lacks: its info, then exactly
  // narSize bytes of NAR, streamed to the farm store, which checks the
  // NAR's structure, size and hash and that its references are there.
  absl::Status AddToStoreNar() {
    kiln::v1::PathInfo info;
    ASSIGN_OR_RETURN(*info.mutable_store_path(), in_.String());
    RETURN_IF_ERROR(CheckStorePath(info.store_path()));
    ASSIGN_OR_RETURN(std::string deriver, in_.String());
    if (!deriver.empty()) RETURN_IF_ERROR(CheckStorePath(deriver));
    info.set_deriver(deriver);
    ASSIGN_OR_RETURN(std::string nar_hash, in_.String());  // Base16, without the algorithm.
    info.set_nar_hash(absl::StrCat("sha256:", nar_hash));
    ASSIGN_OR_RETURN(std::vector<std::string> refs, StorePaths());
    for (std::string& r : refs) info.add_references(std::move(r));
    ASSIGN_OR_RETURN(uint64_t registration_time, in_.U64());
    (void)registration_time;
    ASSIGN_OR_RETURN(uint64_t nar_size, in_.U64());
    ASSIGN_OR_RETURN(uint64_t ultimate, in_.U64());
    (void)ultimate;  // The farm's signature is what clients trust.
    ASSIGN_OR_RETURN(std::vector<std::string> sigs, in_.Strings());
    (void)sigs;
    ASSIGN_OR_RETURN(*info.mutable_ca(), in_.String());
    if (nar_size == 0) return absl::InvalidArgumentError("add-to-store-nar without the NAR's size");
    info.set_nar_size(nar_size);
    RETURN_IF_ERROR(AddFarmPathFrom(farm_, info, in_));
    ++report_.paths_added;
    return Send(ServeWriter().U64(1));
  }

  // One derivation, built on the farm; the reply is Nix's result in the
  // client's dialect.
  absl::Status BuildDerivation() {
    ASSIGN_OR_RETURN(std::string drv_path, in_.String());
    RETURN_IF_ERROR(CheckStorePath(drv_path));
    ASSIGN_OR_RETURN(ServeDerivation drv, ReadServeDerivation(in_));
    const uint64_t version = std::min(report_.client_version, kServeProtocolVersion);
    ASSIGN_OR_RETURN(ServeBuildOptions options, ReadServeBuildOptions(in_, version));
    if (builder_ == nullptr) return absl::UnimplementedError("kiln serve-nix does not build here");
    for (const std::string& p : drv.input_srcs) RETURN_IF_ERROR(CheckStorePath(p));
    const ServeBuildResult result = ResultForClient(builder_->Build(drv_path, drv, options, &LogToStderr));
    ++report_.derivations_built;
    ServeWriter w;
    WriteServeBuildResult(w, result, version);
    return Send(w);
  }

  // Paths in `nix-store --export`'s format, as old clients send them: per
  // path a 1, its NAR (no length ahead: it ends where the archive does),
  // the export magic, the path, references, deriver and a legacy signature
  // flag; a 0 after the last. Every path is read and checked — the NAR's
  // structure, the fields — before any is added (spooled to a temporary
  // file meanwhile), so a bad stream adds nothing; then each is added as
  // add-to-store-nar adds it, in the order sent (references first).
  absl::Status ImportPaths() {
    struct Spooled {
      kiln::v1::PathInfo info;
      long offset = 0;
    };
    std::unique_ptr<std::FILE, int (*)(std::FILE*)> spool(std::tmpfile(), &std::fclose);
    if (spool == nullptr) return absl::InternalError("import-paths: no temporary file to spool the NARs to");
    std::vector<Spooled> paths;
    for (;;) {
      ASSIGN_OR_RETURN(uint64_t more, in_.U64());
      if (more == 0) break;
      if (more != 1) return absl::InvalidArgumentError("import-paths: not the format of nix-store --export");
      if (paths.size() >= ServeLimits{}.max_list_items) {
        return absl::ResourceExhaustedError("import-paths: too many paths in one request");
      }
      Spooled p;
      p.offset = std::ftell(spool.get());
      ASSIGN_OR_RETURN(NarSummary nar, ReadNarPrefix([&](char* buf, size_t size) -> absl::StatusOr<size_t> {
                         ASSIGN_OR_RETURN(size_t n, in_.Some(buf, size));
                         if (std::fwrite(buf, 1, n, spool.get()) != n)
                           return absl::InternalError("import-paths: spool write failed");
                         return n;
                       }));
      ASSIGN_OR_RETURN(uint64_t magic, in_.U64());
      if (magic != kServeExportMagic) return absl::InvalidArgumentError("import-paths: no export magic after a NAR");
      ASSIGN_OR_RETURN(*p.info.mutable_store_path(), in_.String());
      RETURN_IF_ERROR(CheckStorePath(p.info.store_path()));
      ASSIGN_OR_RETURN(std::vector<std::string> refs, StorePaths());
      for (std::string& r : refs) p.info.add_references(std::move(r));
      ASSIGN_OR_RETURN(*p.info.mutable_deriver(), in_.String());
      if (!p.info.deriver().empty()) RETURN_IF_ERROR(CheckStorePath(p.info.deriver()));
      ASSIGN_OR_RETURN(uint64_t signed_flag, in_.U64());
      if (signed_flag == 1) {
        RETURN_IF_ERROR(in_.String().status());  // Nix's own imports ignore it too.
      } else if (signed_flag != 0) {
        return absl::InvalidArgumentError("import-paths: a bad signature flag");
      }
      p.info.set_nar_hash(absl::StrCat("sha256:", absl::BytesToHexString(nar.sha256)));
      p.info.set_nar_size(nar.nar_bytes);
      paths.push_back(std::move(p));
    }
    std::string buf(size_t{256} << 10, '\0');
    for (const Spooled& p : paths) {
      if (std::fseek(spool.get(), p.offset, SEEK_SET) != 0) return absl::InternalError("import-paths: spool seek");
      uint64_t left = p.info.nar_size();
      RETURN_IF_ERROR_CONTEXT(farm_.AddPath(p.info,
                                            [&](NarSink sink) -> absl::Status {
                                              while (left > 0) {
                                                const size_t n = std::fread(
                                                    buf.data(), 1, std::min<uint64_t>(left, buf.size()), spool.get());
                                                if (n == 0) return absl::InternalError("import-paths: spool read");
                                                left -= n;
                                                RETURN_IF_ERROR(sink(absl::string_view(buf.data(), n)));
                                              }
                                              return absl::OkStatus();
                                            }),
                              "adding ", p.info.store_path(), " to the farm store");
      ++report_.paths_added;
    }
    return Send(ServeWriter().U64(1));
  }

  // Derivations to build in the farm store itself (the client's store is
  // the farm: `nix-store --realise --store ssh://…`): see
  // cli/serve_build_paths.h. The answer is 0, or Nix's failure status and
  // message.
  absl::Status BuildPaths() {
    ASSIGN_OR_RETURN(std::vector<std::string> wanted, in_.Strings());
    const uint64_t version = std::min(report_.client_version, kServeProtocolVersion);
    ASSIGN_OR_RETURN(ServeBuildOptions options, ReadServeBuildOptions(in_, version));
    if (builder_ == nullptr) return absl::UnimplementedError("kiln serve-nix does not build here");
    const ServeBuildResult result = ResultForClient(BuildPathsOnFarm(farm_, *builder_, wanted, options, &LogToStderr));
    ++report_.derivations_built;
    if (ServeBuildSucceeded(result.status)) return Send(ServeWriter().U64(0));
    return Send(ServeWriter().U64(static_cast<uint64_t>(result.status)).String(result.error_msg));
  }

  absl::Status QueryClosure() {
    ASSIGN_OR_RETURN(uint64_t include_outputs, in_.U64());
    (void)include_outputs;  // The farm store keeps outputs, not derivations' output lists.
    ASSIGN_OR_RETURN(std::vector<std::string> todo, StorePaths());
    absl::flat_hash_set<std::string> seen(todo.begin(), todo.end());
    std::vector<std::string> closure;
    while (!todo.empty()) {
      const std::string path = std::move(todo.back());
      todo.pop_back();
      absl::StatusOr<NarInfo> info = FarmPathInfo(farm_, path);
      if (absl::IsNotFound(info.status())) continue;  // As Nix: only valid paths.
      RETURN_IF_ERROR(info.status());
      closure.push_back(path);
      for (const std::string& r : info->references) {
        std::string full = FullStorePath(r);
        if (seen.insert(full).second) todo.push_back(std::move(full));
      }
    }
    return Send(ServeWriter().Strings(closure));
  }

  ServeReader& in_;
  absl::FunctionRef<absl::Status(absl::string_view)> out_;
  FarmStoreClient& farm_;
  ServeSessionReport& report_;
  DerivationBuilder* const builder_;
};

}  // namespace

ServeBuildResult ResultForClient(absl::StatusOr<ServeBuildResult> built) {
  if (built.ok()) return *std::move(built);
  ServeBuildResult failed;
  failed.status = ServeBuildStatus::kMiscFailure;
  failed.error_msg = absl::StrCat("kiln: ", built.status().message());
  return failed;
}

absl::Status RunServeSession(ServeReader& in, absl::FunctionRef<absl::Status(absl::string_view)> out,
                             FarmStoreClient& farm, ServeSessionReport* report, DerivationBuilder* builder) {
  ServeSessionReport local;
  return Session(in, out, farm, report != nullptr ? *report : local, builder).Run();
}

int RunServeNixCommand(const CliOptions& options) {
  // stdout is the protocol: a reader that went away is an error, not a
  // signal.
  ::signal(SIGPIPE, SIG_IGN);
  ServeReader in([](char* buf, size_t size) -> absl::StatusOr<size_t> {
    for (;;) {
      const ssize_t n = ::read(STDIN_FILENO, buf, size);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return absl::UnavailableError("cannot read stdin");
      return static_cast<size_t>(n);
    }
  });
  const auto out = [](absl::string_view bytes) -> absl::Status {
    while (!bytes.empty()) {
      const ssize_t n = ::write(STDOUT_FILENO, bytes.data(), bytes.size());
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return absl::UnavailableError("the client went away");
      bytes.remove_prefix(static_cast<size_t>(n));
    }
    return absl::OkStatus();
  };
  const std::shared_ptr<grpc::Channel> channel = Channel(options);
  GrpcFarmStoreClient farm(channel);
  FarmDerivationBuilder builder(channel, farm, options, STDIN_FILENO);
  ServeSessionReport report;
  const absl::Status status = RunServeSession(in, out, farm, &report, &builder);
  if (status.ok()) return kExitOk;
  // Nix shows the remote's stderr to its user.
  std::fprintf(stderr, "kiln serve-nix: %s\n", std::string(status.message()).c_str());
  return absl::IsUnavailable(status) ? kExitUnavailable : kExitBuildFailed;
}

}  // namespace kiln
