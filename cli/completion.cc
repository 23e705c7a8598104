#include "cli/completion.h"

#include <set>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"

namespace kiln {
namespace {

struct Command {
  std::string name;
  std::string description;
  std::vector<std::pair<std::string, std::string>> options;  // (--long or -s, description)
  bool takes_paths = false;
};

std::vector<std::pair<std::string, std::string>> OptionsOf(const CLI::App& app) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const CLI::Option* o : app.get_options()) {
    if (o->get_positional()) continue;
    for (const std::string& name : o->get_lnames()) out.emplace_back("--" + name, o->get_description());
    for (const std::string& name : o->get_snames()) out.emplace_back("-" + name, o->get_description());
  }
  return out;
}

std::vector<Command> CommandsOf(const CLI::App& app) {
  std::vector<Command> out;
  for (const CLI::App* sub : app.get_subcommands({})) {
    Command c{.name = sub->get_name(), .description = sub->get_description(), .options = OptionsOf(*sub)};
    // Commands that take a flake directory complete paths too.
    c.takes_paths = c.name == "build" || c.name == "fod-hash";
    out.push_back(std::move(c));
  }
  return out;
}

// The option names of `options`, then of `more`, each once.
std::string Words(const std::vector<std::pair<std::string, std::string>>& options,
                  const std::vector<std::pair<std::string, std::string>>& more = {}) {
  std::vector<std::string> words;
  std::set<std::string> seen;
  for (const auto* list : {&options, &more}) {
    for (const auto& [name, _] : *list) {
      if (seen.insert(name).second) words.push_back(name);
    }
  }
  return absl::StrJoin(words, " ");
}

std::string Bash(const CLI::App& app) {
  const std::string fn = "_" + absl::StrReplaceAll(app.get_name(), {{"-", "_"}});
  const std::vector<Command> commands = CommandsOf(app);
  std::vector<std::string> names;
  for (const Command& c : commands) names.push_back(c.name);
  std::string out = absl::StrCat("# ", app.get_name(), " completion for bash (", app.get_name(),
                                 " completion bash > /etc/bash_completion.d/", app.get_name(), ")\n", fn,
                                 "() {\n"
                                 "  local cur=\"${COMP_WORDS[COMP_CWORD]}\" cmd=\"\" w\n"
                                 "  for w in \"${COMP_WORDS[@]:1:COMP_CWORD-1}\"; do\n"
                                 "    case \"$w\" in ",
                                 absl::StrJoin(names, "|"),
                                 ") cmd=$w; break ;; esac\n"
                                 "  done\n"
                                 "  case \"$cmd\" in\n"
                                 "    \"\") COMPREPLY=($(compgen -W \"",
                                 absl::StrJoin(names, " "), " ", Words(OptionsOf(app)), "\" -- \"$cur\")) ;;\n");
  for (const Command& c : commands) {
    absl::StrAppend(&out, "    ", c.name, ") COMPREPLY=($(compgen -W \"", Words(c.options, OptionsOf(app)),
                    "\" -- \"$cur\"))");
    if (c.takes_paths) absl::StrAppend(&out, "; [[ $cur == -* ]] || COMPREPLY+=($(compgen -d -- \"$cur\"))");
    absl::StrAppend(&out, " ;;\n");
  }
  absl::StrAppend(&out, "  esac\n}\ncomplete -F ", fn, " ", app.get_name(), "\n");
  return out;
}

std::string FishQuoted(const std::string& text) {
  return absl::StrCat("'", absl::StrReplaceAll(text.substr(0, 100), {{"\\", "\\\\"}, {"'", "\\'"}}), "'");
}

std::string Fish(const CLI::App& app) {
  const std::string name = app.get_name();
  const std::vector<Command> commands = CommandsOf(app);
  std::string out =
      absl::StrCat("# ", name, " completion for fish (", name, " completion fish > ~/.config/fish/completions/", name,
                   ".fish)\ncomplete -c ", name, " -f\n");
  for (const Command& c : commands) {
    absl::StrAppend(&out, "complete -c ", name, " -n __fish_use_subcommand -a ", c.name, " -d ",
                    FishQuoted(c.description), "\n");
    for (const auto& [option, description] : c.options) {
      const bool is_long = option.rfind("--", 0) == 0;
      absl::StrAppend(&out, "complete -c ", name, " -n '__fish_seen_subcommand_from ", c.name, "' ",
                      is_long ? "-l " : "-s ", option.substr(is_long ? 2 : 1), " -d ", FishQuoted(description), "\n");
    }
    if (c.takes_paths) {
      absl::StrAppend(&out, "complete -c ", name, " -n '__fish_seen_subcommand_from ", c.name, "' -F\n");
    }
  }
  for (const auto& [option, description] : OptionsOf(app)) {
    if (option.rfind("--", 0) != 0) continue;
    absl::StrAppend(&out, "complete -c ", name, " -l ", option.substr(2), " -d ", FishQuoted(description), "\n");
  }
  return out;
}

}  // namespace

std::string CompletionScript(const CLI::App& app, const std::string& shell) {
  if (shell == "bash") return Bash(app);
  // zsh runs the bash completion through its bashcompinit layer.
  if (shell == "zsh") {
    return absl::StrCat("# ", app.get_name(), " completion for zsh (", app.get_name(),
                        " completion zsh > \"${fpath[1]}/_", app.get_name(), "\", or source it from ~/.zshrc)\n",
                        "autoload -U +X bashcompinit && bashcompinit\n", Bash(app));
  }
  if (shell == "fish") return Fish(app);
  return "";
}

}  // namespace kiln
