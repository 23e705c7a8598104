// The CLI's shared client: the channel and stubs (one per process), how a
// call's failure reads and what exit code it gives, and the two steps every
// command that builds goes through — submitting targets (uploading what the
// coordinator lacks) and following a job's events to its end. Each command
// family (build_command.cc, jobs_command.cc, fod_command.cc) builds on it.
#pragma once

#include <chrono>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cli/build_view.h"
#include "cli/cli.h"
#include "common/cas_client.h"
#include "kiln/v1/builds.grpc.pb.h"
#include "kiln/v1/cas.grpc.pb.h"
#include "kiln/v1/farm.grpc.pb.h"

namespace kiln {

// Messages may quote what came from elsewhere (ids, names, another user's
// target): control characters are shown, not acted on. Err: stderr; Out:
// a line for people on stdout.
void Err(const std::string& text);
void Out(const std::string& text);

// The exit code for a failed call (see cli.h), and the status for people.
int ExitCodeFor(const absl::Status& status);
std::string Describe(const absl::Status& status);
// Prints "error: …" and returns the exit code.
int ReportError(const absl::Status& status);

// user@host, for the coordinator's records.
std::string Submitter();

// One channel and stub per service for the whole (short-lived) process.
std::shared_ptr<grpc::Channel> Channel(const CliOptions& options);
kiln::v1::BuildService::Stub& Coordinator(const CliOptions& options);
kiln::v1::CasService::Stub& Cas(const CliOptions& options);
kiln::v1::FarmService::Stub& Farm(const CliOptions& options);
// Where the CLI remembers file digests between runs (see DigestCache).
std::string DigestCachePath();

// A call's status as the user should read it: an unreachable coordinator is
// named, with how to point the CLI at another one.
absl::Status FromCoordinator(const grpc::Status& status, const CliOptions& options);

// Runs one unary call with a deadline; `call` issues it on the context.
template <typename Call>
absl::Status UnaryCall(const CliOptions& options, Call call) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  return FromCoordinator(call(context), options);
}

// One flake to build: its directory (canonical) and attribute.
struct Target {
  std::string text;  // As the user wrote it.
  std::filesystem::path dir;
  std::string attr;
  kiln::v1::FodTask fod_task;  // `kiln fod-hash`'s jobs; default: a build.
};
absl::StatusOr<Target> ResolveTarget(const std::string& text);

// Uploads what the coordinator lacks of the targets' tree and submits them
// as one buildset; job ids in target order.
absl::StatusOr<std::vector<std::string>> Submit(kiln::v1::BuildService::Stub& stub, const CliOptions& options,
                                                const std::vector<Target>& targets, UploadStats& uploaded,
                                                BuildView* view = nullptr, std::string* buildset_id = nullptr);

// Passes one job's events to `view` until its terminal event; resumes after
// a broken stream (e.g. a coordinator restart) from the last event seen.
absl::StatusOr<kiln::v1::JobEvent::Finished> Watch(kiln::v1::BuildService::Stub& stub, const CliOptions& options,
                                                   BuildView& view, size_t index, const std::string& job_id,
                                                   absl::flat_hash_set<std::string>& shown_errors);

}  // namespace kiln
