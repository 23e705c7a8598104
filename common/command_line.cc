#include "common/command_line.h"

#include <cstdio>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/cli_args.h"

namespace kiln {

void UseKilnConventions(CLI::App& app) { app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast); }

std::vector<std::string> DashedOptionNames(int argc, char** argv) { return RespellOptionNames(argc, argv, '_', '-'); }

std::optional<int> ParseCommandLine(CLI::App& app, int argc, char** argv) {
  std::vector<std::string> args = DashedOptionNames(argc, argv);
  // CLI11 takes the arguments in reverse, without the program's name.
  std::vector<std::string> reversed(args.rbegin(), args.rend() - (args.empty() ? 0 : 1));
  try {
    app.parse(std::move(reversed));
  } catch (const CLI::CallForHelp&) {
    std::printf("%s", app.help().c_str());
    return kExitOk;
  } catch (const CLI::CallForAllHelp&) {
    std::printf("%s", app.help("", CLI::AppFormatMode::All).c_str());
    return kExitOk;
  } catch (const CLI::ParseError& e) {
    const std::string name = app.get_name();
    std::fprintf(stderr, "%s: %s (see %s --help)\n", name.c_str(), e.what(), name.c_str());
    return kExitUsage;
  }
  return std::nullopt;
}

CLI::Option* AddDurationOption(CLI::App& app, const std::string& name, absl::Duration* value, const std::string& help) {
  return app
      .add_option_function<std::string>(
          name,
          [value, name](const std::string& text) {
            absl::Duration d;
            if (text == "0") {
              *value = absl::ZeroDuration();
            } else if (absl::ParseDuration(text, &d) && d >= absl::ZeroDuration()) {
              *value = d;
            } else {
              throw CLI::ValidationError(
                  name, absl::StrCat("'", text, "' is not a duration (say 90s, 10m or 1h30m; 0 for none)"));
            }
          },
          help)
      ->type_name("DURATION")
      ->default_str(*value == absl::ZeroDuration() ? "0" : absl::FormatDuration(*value));
}

CLI::Option* AddListOption(CLI::App& app, const std::string& name, std::vector<std::string>* value,
                           const std::string& help) {
  return app
      .add_option_function<std::vector<std::string>>(
          name,
          [value](const std::vector<std::string>& items) {
            value->clear();
            for (const std::string& item : items) {
              for (absl::string_view part : absl::StrSplit(item, ',', absl::SkipEmpty())) {
                value->emplace_back(part);
              }
            }
          },
          help)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll)
      ->type_name("A,B,...")
      ->expected(0, CLI::detail::expected_max_vector_size)
      ->default_str(absl::StrJoin(*value, ","));
}

void AddConfigFileOption(CLI::App& app) {
  app.set_config("--config", "", "Read options from FILE: `name = value` lines (TOML or INI), names without dashes",
                 /*config_required=*/false)
      ->type_name("FILE");
  // A misspelt name in the file is an error, not silently ignored.
  app.allow_config_extras(CLI::config_extras_mode::error);
}

}  // namespace kiln
