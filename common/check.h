// Invariant checks. This Abseil has no absl/log, so Kiln owns two macros:
// KILN_CHECK for invariants whose violation means the process state is no
// longer trustworthy (it aborts with the location), KILN_DCHECK for costly ones
// checked in debug builds only. Never use them for untrusted input: return a
// Status instead.
#pragma once

#include <cstdio>
#include <cstdlib>

#define KILN_CHECK(cond)                                                            \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                 \
    }                                                                               \
  } while (0)

#ifdef NDEBUG
#define KILN_DCHECK(cond) \
  do {                    \
  } while (0)
#else
#define KILN_DCHECK(cond) KILN_CHECK(cond)
#endif
