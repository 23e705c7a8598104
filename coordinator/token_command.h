// `kiln-coordinator token create|list|revoke` and `backup`: administration
// through the running coordinator's admin socket, or straight in the state
// directory when no coordinator runs there.
#pragma once

#include <string>
#include <vector>

namespace kiln {

struct TokenCommand {
  std::string action;  // create, list, revoke
  std::string state_dir;
  std::string name;                 // create: --name; revoke: the argument
  std::vector<std::string> scopes;  // create: --scope
  bool json = false;
};

// Prints to stdout/stderr; returns the process's exit code (0 done, 1
// refused or failed, 2 bad usage).
int RunTokenCommand(const TokenCommand& command);

// `kiln-coordinator backup --state-dir=DIR DESTINATION`: a consistent copy of
// the state in DESTINATION (see RocksDbStateStore::Backup), made by the
// running coordinator, or here when none runs. Same exit codes.
int RunBackupCommand(const std::string& state_dir, const std::string& destination, bool json);

}  // namespace kiln
