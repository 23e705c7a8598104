// Shell completion for kiln, generated from its command line (CLI11's app
// tree): commands, each command's options, and directories where a command
// takes a flake. `kiln completion bash|zsh|fish` prints the script.
#pragma once

#include <string>

#include <CLI/CLI.hpp>

namespace kiln {

// The completion script of `app` for `shell` (bash, zsh or fish); empty for
// another shell.
std::string CompletionScript(const CLI::App& app, const std::string& shell);

}  // namespace kiln
