// The exit codes of kiln, kiln-coordinator and kiln-worker: one set, so a
// script reads them the same way whichever it runs (README, "Exit codes").
#pragma once

namespace kiln {

inline constexpr int kExitOk = 0;
// The work failed: a build failed or was cancelled (kiln), a daemon could
// not start.
inline constexpr int kExitBuildFailed = 1;
// A bad command line, config file or input.
inline constexpr int kExitUsage = 2;
// The coordinator could not be reached.
inline constexpr int kExitUnavailable = 3;
// The coordinator is out of disk space and takes no new work until an
// operator frees some (it resumes by itself): retrying at once will not help.
inline constexpr int kExitCoordinatorOutOfSpace = 4;
// The user (Ctrl-C) or CI (SIGTERM) interrupted the command (for `kiln
// build`: its builds were cancelled): 128 + SIGINT, as shells report it.
inline constexpr int kExitInterrupted = 130;

}  // namespace kiln
