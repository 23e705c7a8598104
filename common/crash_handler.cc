#include "common/crash_handler.h"

#include <execinfo.h>

#include <algorithm>
#include <csignal>
#include <cstdint>
#ifdef __linux__
#include <ucontext.h>
#endif

#include "absl/debugging/failure_signal_handler.h"
#include "absl/debugging/stacktrace.h"
#include "absl/debugging/symbolize.h"

namespace kiln {
namespace {

// The program counter where the signal struck, from the handler's context;
// 0 where this platform's layout is not known here.
uintptr_t InterruptedPc(const void* uc) {
#if defined(__linux__) && defined(__x86_64__)
  if (uc != nullptr) return static_cast<uintptr_t>(static_cast<const ucontext_t*>(uc)->uc_mcontext.gregs[REG_RIP]);
#elif defined(__linux__) && defined(__aarch64__)
  if (uc != nullptr) return static_cast<uintptr_t>(static_cast<const ucontext_t*>(uc)->uc_mcontext.pc);
#endif
  return 0;
}

// Abseil's own unwinder on x86-64 follows frame pointers, which Debian's
// libraries and Kiln's optimised code do not keep: a trace through abort()
// stopped at its first frame. The C library's backtrace() unwinds with the
// DWARF call-frame tables every object carries, through signal frames and
// shared libraries alike. With a signal's context, the trace starts at the
// interrupted frame, so the handler's own frames are left out.
int UnwindWithCallFrameTables(void** pcs, int* sizes, int max_depth, int skip_count, const void* uc,
                              int* min_dropped_frames) {
  constexpr int kMaxFrames = 128;
  void* frames[kMaxFrames];
  const int n = ::backtrace(frames, kMaxFrames);
  int first = std::min(n, skip_count + 1);  // This function's frame too.
  if (const uintptr_t pc = InterruptedPc(uc); pc != 0) {
    for (int i = 0; i < n; ++i) {
      if (reinterpret_cast<uintptr_t>(frames[i]) == pc) {
        first = i;
        break;
      }
    }
  }
  const int count = std::min(max_depth, n - first);
  for (int i = 0; i < count; ++i) {
    pcs[i] = frames[first + i];
    if (sizes != nullptr) sizes[i] = 0;  // Not known; only used for display.
  }
  if (min_dropped_frames != nullptr) *min_dropped_frames = std::max(0, n - first - count);
  return count;
}

}  // namespace

void InstallCrashHandler(const char* argv0) {
  absl::InitializeSymbolizer(argv0);
  // backtrace() loads the unwinder (libgcc_s) on its first call, which a
  // signal handler must not be the one to do.
  void* warm_up[4];
  ::backtrace(warm_up, 4);
  absl::SetStackUnwinder(UnwindWithCallFrameTables);
  // Abseil's handler takes SIGTERM as well; for Kiln it is the request to
  // stop cleanly (the daemons take it with sigwait, the CLI cancels its
  // builds), never a crash. Keep whatever SIGTERM did before.
  struct sigaction term_before {};
  const bool saved = ::sigaction(SIGTERM, nullptr, &term_before) == 0;
  absl::FailureSignalHandlerOptions options;
  // On its own stack, so a stack overflow is reported too.
  options.use_alternate_stack = true;
  // A handler stuck on a corrupted heap must not keep a unit from being
  // restarted: the process aborts after this many seconds regardless.
  options.alarm_on_failure_secs = 5;
  // The report goes to stderr (the daemons' log), and nowhere else.
  options.writerfn = nullptr;
  absl::InstallFailureSignalHandler(options);
  if (saved) ::sigaction(SIGTERM, &term_before, nullptr);
}

}  // namespace kiln
