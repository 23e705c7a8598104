// Reading what `nix build` prints.
//
// NixLogParser turns the stderr of `nix --log-format internal-json` into the
// lines a person wants to see: build output tagged with its derivation, the
// "building '…'" announcements, and Nix's own messages (errors and warnings),
// with terminal colours removed. Lines that are not internal-json pass through
// unchanged, so the parser also copes with plain output.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace kiln {

struct NixLogEvent {
  enum class Kind {
    kBuildOutput,  // A line the builder printed.
    kActivity,     // Nix starting something worth showing ("building '…'").
    kMessage,      // A Nix message (error, warning, info).
  };
  Kind kind = Kind::kMessage;
  std::string derivation;  // Short name ("hello"), for build output.
  std::string text;
  int level = 3;  // Nix verbosity: 0 error, 1 warn, 2 notice, 3 info, …
};

// A derivation Nix built (or checked) during the run, from its "building"
// activity.
struct NixBuildActivity {
  std::string drv_path;
  absl::Time started;
  absl::Duration duration = absl::ZeroDuration();  // Set when it stopped.
  bool stopped = false;
};

class NixLogParser {
 public:
  // Messages and activities above this level are dropped (3 = info, what
  // `nix build` shows by default).
  explicit NixLogParser(int max_level = 3) : max_level_(max_level) {}

  // Parses one stderr line. Returns nothing for lines that carry no text a
  // person should see (progress counters, activity stops, chatty levels).
  std::optional<NixLogEvent> ParseLine(absl::string_view line);

  // Error-level messages seen so far, colours stripped, in order.
  const std::vector<std::string>& errors() const { return errors_; }

  // Every derivation build started so far, in order (times are when the
  // lines were parsed: the log arrives as it is written).
  const std::vector<NixBuildActivity>& builds() const { return builds_; }

 private:
  int max_level_;
  absl::flat_hash_map<uint64_t, std::string> activity_derivation_;
  std::vector<std::string> errors_;
  std::vector<NixBuildActivity> builds_;
  absl::flat_hash_map<uint64_t, size_t> build_index_;  // activity id -> builds_ index
};

// Removes ANSI escape sequences (colours, cursor movement).
std::string StripAnsi(absl::string_view text);

// Nix's error text (one error or several, each possibly with log lines
// under it) as one line a person reads at a glance: the first error without
// its "error: " prefixes, then how many more there were; at most
// `max_chars` characters.
std::string OneLineNixError(absl::string_view message, size_t max_chars = 300);

// "/nix/store/<hash>-hello-1.0.drv" -> "hello-1.0". Other input is returned
// as it is.
std::string DerivationShortName(absl::string_view drv_path);

// One element of `nix build --json` output.
struct NixBuiltPath {
  std::string drv_path;
  std::map<std::string, std::string> outputs;  // Output name -> store path.
};

// Parses the stdout of `nix build --json`.
absl::StatusOr<std::vector<NixBuiltPath>> ParseNixBuildJson(absl::string_view json);

}  // namespace kiln
