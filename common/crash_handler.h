// Crash reports: a process that dies of a fatal signal (SIGABRT from a failed
// KILN_CHECK or std::terminate, SIGSEGV, SIGBUS, SIGFPE, SIGILL) writes the
// signal and a symbolized stack trace of the failing thread to stderr — the
// daemons' log — before it dies of that signal as it would have anyway (so
// systemd still sees a failure and the kernel still writes a core dump).
#pragma once

namespace kiln {

// Call first thing in main(), with main's argv[0] (the symbolizer reads the
// program's own symbol table through it). Installs Abseil's failure signal
// handler. Idempotent enough for tests: a second call reinstalls it.
void InstallCrashHandler(const char* argv0);

}  // namespace kiln
