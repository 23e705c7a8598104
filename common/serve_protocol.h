// Nix's serve protocol — what `nix-store --serve` speaks on stdin/stdout
// and what Nix's `ssh://` store and remote builders speak to it — as frames:
// little-endian u64 numbers, and strings as a u64 length, the bytes and zero
// padding to a multiple of 8. ServeReader reads them from a byte source,
// bounded (a string's length, a list's size) and checked (the padding is
// zero), so nothing a peer sends can make it allocate without limit;
// ServeWriter builds them.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/derivation.h"

namespace kiln {

inline constexpr uint64_t kServeMagic1 = 0x390c9deb;  // Client's hello.
inline constexpr uint64_t kServeMagic2 = 0x5452eecb;  // Server's answer.
// After each NAR in `nix-store --export`'s format (import-paths).
inline constexpr uint64_t kServeExportMagic = 0x4558494e;
// Major 2, minor 7: what Nix 2.8's nix-store --serve speaks.
inline constexpr uint64_t kServeProtocolVersion = 0x207;
inline constexpr uint64_t ServeMinor(uint64_t version) { return version & 0xff; }
inline constexpr uint64_t ServeMajor(uint64_t version) { return version & 0xff00; }

enum class ServeCommand : uint64_t {
  kQueryValidPaths = 1,
  kQueryPathInfos = 2,
  kDumpStorePath = 3,
  kImportPaths = 4,
  kExportPaths = 5,
  kBuildPaths = 6,
  kQueryClosure = 7,
  kBuildDerivation = 8,
  kAddToStoreNar = 9,
};

struct ServeLimits {
  size_t max_string_bytes = size_t{1} << 20;  // A path, a hash, an environment value.
  size_t max_list_items = size_t{1} << 20;    // Paths in one request.
};

class ServeReader {
 public:
  // Reads up to `size` bytes into `buf`; 0 at the end of the input.
  using Source = absl::AnyInvocable<absl::StatusOr<size_t>(char* buf, size_t size)>;
  explicit ServeReader(Source source, ServeLimits limits = {});

  // OUT_OF_RANGE when the input ends before the number's first byte (the
  // peer is done); DATA_LOSS when it ends inside it.
  absl::StatusOr<uint64_t> U64();
  absl::StatusOr<std::string> String();
  absl::StatusOr<std::vector<std::string>> Strings();
  // Exactly `n` bytes, unframed (a NAR's body).
  absl::Status Raw(char* buf, size_t n);
  // Up to `n` bytes, at least one (DATA_LOSS at the end of the input).
  absl::StatusOr<size_t> Some(char* buf, size_t n);

 private:
  absl::Status Fill();

  Source source_;
  const ServeLimits limits_;
  std::string buffer_;
  size_t begin_ = 0, end_ = 0;
};

class ServeWriter {
 public:
  ServeWriter& U64(uint64_t v);
  ServeWriter& String(absl::string_view s);
  ServeWriter& Strings(const std::vector<std::string>& list);
  ServeWriter& Raw(absl::string_view bytes);
  const std::string& data() const { return data_; }
  void Clear() { data_.clear(); }

 private:
  std::string data_;
};

// A derivation as build-derivation carries it (Nix's BasicDerivation: the
// input derivations already replaced by their outputs among the sources).
struct ServeDerivationOutput {
  std::string name;       // "out"
  std::string path;       // Empty for floating content-addressed outputs.
  std::string hash_algo;  // Fixed outputs: "r:sha256" (recursive) or "sha256"; else empty.
  std::string hash;       // Fixed outputs: base16; else empty.
};

struct ServeDerivation {
  std::vector<ServeDerivationOutput> outputs;  // In name order, as Nix sends them.
  std::vector<std::string> input_srcs;
  std::string platform;
  std::string builder;
  std::vector<std::string> args;
  std::vector<std::pair<std::string, std::string>> env;  // In key order.
};

absl::StatusOr<ServeDerivation> ReadServeDerivation(ServeReader& in);
// A derivation held whole in `bytes` (a job's DerivationTask): trailing
// bytes are an error.
absl::StatusOr<ServeDerivation> DecodeServeDerivation(absl::string_view bytes);
void WriteServeDerivation(ServeWriter& out, const ServeDerivation& drv);
// The same derivation as a .drv file would hold it, resolved (no input
// derivations): what GetFixedOutput takes.
Derivation ToDerivation(const ServeDerivation& drv);
// A resolved derivation (ResolveInputs) as build-derivation carries it.
ServeDerivation ToServeDerivation(const Derivation& resolved);

// The limits a client sends after a build request, per the protocol
// version both ends speak (the lower of theirs).
struct ServeBuildOptions {
  uint64_t max_silent_time = 0;  // Seconds; 0: none.
  uint64_t build_timeout = 0;    // Seconds; 0: none.
  uint64_t max_log_size = 0;     // Bytes; 0: none (minor >= 2).
  uint64_t build_repeat = 0;     // Minor >= 3.
  bool enforce_determinism = false;
  bool keep_failed = false;  // Minor >= 7.
};

absl::StatusOr<ServeBuildOptions> ReadServeBuildOptions(ServeReader& in, uint64_t version);
void WriteServeBuildOptions(ServeWriter& out, const ServeBuildOptions& options, uint64_t version);

// Nix's BuildResult::Status.
enum class ServeBuildStatus : uint64_t {
  kBuilt = 0,
  kSubstituted = 1,
  kAlreadyValid = 2,
  kPermanentFailure = 3,
  kInputRejected = 4,
  kOutputRejected = 5,
  kTransientFailure = 6,
  kCachedFailure = 7,
  kTimedOut = 8,
  kMiscFailure = 9,
  kDependencyFailed = 10,
  kLogLimitExceeded = 11,
  kNotDeterministic = 12,
  kResolvesToAlreadyValid = 13,
  kNoSubstituters = 14,
};

// Nix's "the outputs are there": built, substituted or already valid.
inline bool ServeBuildSucceeded(ServeBuildStatus s) {
  return s == ServeBuildStatus::kBuilt || s == ServeBuildStatus::kSubstituted || s == ServeBuildStatus::kAlreadyValid;
}

struct ServeBuildResult {
  ServeBuildStatus status = ServeBuildStatus::kMiscFailure;
  std::string error_msg;
  uint64_t times_built = 0;  // Minor >= 3, with the next three.
  bool non_deterministic = false;
  uint64_t start_time = 0, stop_time = 0;  // Unix seconds.
  // Minor >= 6: content-addressed outputs' realisations (DrvOutput id, its
  // JSON); empty for input-addressed derivations.
  std::vector<std::pair<std::string, std::string>> built_outputs;
};

// built_outputs for a build result, as servers since Nix 2.6 write them and
// clients of 2.6 to today read them: per output, the id
// "sha256:<64 zeros>!NAME" (newer clients read only the output's name from
// it) and a realisation {"id": …, "outPath": "HASH-NAME"}.
std::vector<std::pair<std::string, std::string>> ServeBuiltOutputs(
    const std::vector<std::pair<std::string, std::string>>& outputs);  // Name -> store path.

absl::StatusOr<ServeBuildResult> ReadServeBuildResult(ServeReader& in, uint64_t version);
void WriteServeBuildResult(ServeWriter& out, const ServeBuildResult& result, uint64_t version);

}  // namespace kiln
