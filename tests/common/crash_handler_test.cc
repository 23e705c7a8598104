// The crash report: a failed KILN_CHECK or a fatal signal leaves the
// condition and a symbolized stack trace on stderr, and the process still
// dies of the signal. Each case runs in a death test's child process.
#include "common/crash_handler.h"

#include <gtest/gtest.h>

#include <sys/mman.h>

#include <csignal>

#include "common/check.h"

namespace kiln {
namespace {

// Named frames the trace must show; noinline so they stay frames.
__attribute__((noinline)) void FailingCheckInKiln(int value) {
  KILN_CHECK(value == 42);
  asm volatile("");
}

__attribute__((noinline)) void CallerOfFailingCheck(int value) {
  FailingCheckInKiln(value + 1);
  asm volatile("");
}

// A store to a page mapped without access: a real fault, which neither
// sanitizer reports first (the address is valid for them).
__attribute__((noinline)) void WriteToProtectedPage() {
  void* page = ::mmap(nullptr, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(page, MAP_FAILED);
  *static_cast<volatile int*>(page) = 1;
  asm volatile("");
}

TEST(CrashHandlerDeathTest, FailedCheckNamesConditionAndPrintsTheStack) {
  EXPECT_EXIT(
      {
        InstallCrashHandler("/proc/self/exe");
        CallerOfFailingCheck(1);
      },
      ::testing::KilledBySignal(SIGABRT),
      // Condition, file and line; then the signal and the frames that led
      // to it, through abort() in the C library.
      "crash_handler_test.cc:[0-9]+: check failed: value == 42.*"
      "SIGABRT received.*abort.*FailingCheckInKiln.*CallerOfFailingCheck");
}

TEST(CrashHandlerDeathTest, SegmentationFaultPrintsTheFaultingFrame) {
  EXPECT_EXIT(
      {
        InstallCrashHandler("/proc/self/exe");
        WriteToProtectedPage();
      },
      ::testing::KilledBySignal(SIGSEGV), "SIGSEGV received.*WriteToProtectedPage");
}

TEST(CrashHandlerDeathTest, AbortWithoutHandlerPrintsNoTrace) {
  // The test above is not vacuous: without the handler there is no trace.
  EXPECT_EXIT(CallerOfFailingCheck(1), ::testing::KilledBySignal(SIGABRT), "check failed: value == 42[^*]*$");
}

TEST(CrashHandlerTest, SigtermIsLeftAsItWas) {
  // Daemons stop cleanly on SIGTERM (taken with sigwait) and the CLI cancels
  // its builds on it: the crash handler must not take it over.
  struct sigaction before {};
  ASSERT_EQ(::sigaction(SIGTERM, nullptr, &before), 0);
  InstallCrashHandler("/proc/self/exe");
  struct sigaction after {};
  ASSERT_EQ(::sigaction(SIGTERM, nullptr, &after), 0);
  EXPECT_EQ(after.sa_handler, before.sa_handler);
  // The fatal ones are taken.
  struct sigaction segv {};
  ASSERT_EQ(::sigaction(SIGSEGV, nullptr, &segv), 0);
  EXPECT_NE(segv.sa_handler, SIG_DFL);
}

}  // namespace
}  // namespace kiln
