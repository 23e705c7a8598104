// Command lines of the three binaries on CLI11: one set of conventions.
//
// - Options are spelled with dashes (--metrics-listen), as documented; the
//   underscore spellings earlier releases accepted (--metrics_listen) still
//   parse, as the same option.
// - Durations take units ("90s", "10m", "1h30m"; "0" for none) and are
//   checked as they are parsed; sizes are whole numbers in the unit their
//   name says (--blob-cache-mb).
// - Daemons read a config file with --config=FILE: `name = value` lines
//   (TOML or INI), names as on the command line without the dashes;
//   the command line wins over the file.
// - Exit codes are the same everywhere (common/exit_codes.h).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "absl/time/time.h"
#include "common/exit_codes.h"

namespace kiln {

// Kiln's conventions for an app, before its options are added: an option
// given twice takes its last value (as with the flags library used before;
// list options add up instead).
void UseKilnConventions(CLI::App& app);

// `argv` with option names spelled with dashes ("--a_b=c" becomes
// "--a-b=c"); values, positional arguments and everything after "--" stay.
std::vector<std::string> DashedOptionNames(int argc, char** argv);

// Parses `argv` into `app`. Returns nullopt to go on; otherwise the exit
// code: 0 after --help (printed on stdout), kExitUsage after printing
// "PROGRAM: what is wrong (see PROGRAM --help)" on stderr.
std::optional<int> ParseCommandLine(CLI::App& app, int argc, char** argv);

// A duration option: "30s", "10m", "1h30m", "0"; refused without a unit.
CLI::Option* AddDurationOption(CLI::App& app, const std::string& name, absl::Duration* value, const std::string& help);

// A comma-separated list option (also repeatable): --labels=a=b,c=d.
CLI::Option* AddListOption(CLI::App& app, const std::string& name, std::vector<std::string>* value,
                           const std::string& help);

// --config=FILE, read before the command line is applied.
void AddConfigFileOption(CLI::App& app);

}  // namespace kiln
