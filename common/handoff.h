// Happens-before edges that ThreadSanitizer cannot see for itself.
//
// Debian's gRPC is not instrumented, so the order it guarantees between a
// reactor's operations and reactions (StartWrite before its OnWriteDone, every
// reaction before OnDone) is made of atomics TSan never sees, and it would
// report the reactor's own members as raced. Kiln marks those edges on its
// side of the seam: HandOff(obj) before giving `obj` to gRPC (starting an
// operation, returning from a reaction), TakeOver(obj) when gRPC gives it back
// (at the start of a reaction). Outside TSan builds both compile to nothing.
#pragma once

#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define KILN_TSAN_BUILD 1
#endif
#endif
#if defined(__SANITIZE_THREAD__)
#define KILN_TSAN_BUILD 1
#endif

#ifdef KILN_TSAN_BUILD
extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);
#endif

namespace kiln {

inline void HandOff([[maybe_unused]] const void* obj) {
#ifdef KILN_TSAN_BUILD
  __tsan_release(const_cast<void*>(obj));
#endif
}

inline void TakeOver([[maybe_unused]] const void* obj) {
#ifdef KILN_TSAN_BUILD
  __tsan_acquire(const_cast<void*>(obj));
#endif
}

// For the length of a reaction that does not delete its reactor (OnDone
// does: it calls TakeOver alone): takes the reactor over at the start and
// hands it back at the end.
class Reaction {
 public:
  explicit Reaction(const void* reactor) : reactor_(reactor) { TakeOver(reactor_); }
  ~Reaction() { HandOff(reactor_); }
  Reaction(const Reaction&) = delete;
  Reaction& operator=(const Reaction&) = delete;

 private:
  const void* const reactor_;
};

}  // namespace kiln
