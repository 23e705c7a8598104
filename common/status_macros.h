// Early returns on errors, written once.
//
//   RETURN_IF_ERROR(store->Commit(write));
//   ASSIGN_OR_RETURN(std::string bytes, store->GetLog(id));
//   ASSIGN_OR_RETURN(auto tree, ReadTree(root), "read tree ", root.hash());
//
// The optional trailing arguments of ASSIGN_OR_RETURN and
// RETURN_IF_ERROR_CONTEXT say what was being done; they prefix the message
// ("read tree 3f…: NOT_FOUND …" keeps the code, adds the context), so an
// error that crosses a module tells where it came from. They are evaluated
// only on the error path.
#pragma once

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace kiln {

// `status` with `context` before its message (the code kept); OK stays OK.
template <typename... Context>
absl::Status WithContext(const absl::Status& status, const Context&... context) {
  if (status.ok() || sizeof...(Context) == 0) return status;
  return absl::Status(status.code(), absl::StrCat(context..., ": ", status.message()));
}

}  // namespace kiln

#define KILN_STATUS_MACROS_CONCAT_INNER(a, b) a##b
#define KILN_STATUS_MACROS_CONCAT(a, b) KILN_STATUS_MACROS_CONCAT_INNER(a, b)

#define RETURN_IF_ERROR(expr)                                                   \
  do {                                                                          \
    if (::absl::Status kiln_status_macro_ = (expr); !kiln_status_macro_.ok()) { \
      return kiln_status_macro_;                                                \
    }                                                                           \
  } while (false)

#define RETURN_IF_ERROR_CONTEXT(expr, ...)                                      \
  do {                                                                          \
    if (::absl::Status kiln_status_macro_ = (expr); !kiln_status_macro_.ok()) { \
      return ::kiln::WithContext(kiln_status_macro_, __VA_ARGS__);              \
    }                                                                           \
  } while (false)

#define ASSIGN_OR_RETURN(lhs, expr, ...) \
  KILN_ASSIGN_OR_RETURN_IMPL(KILN_STATUS_MACROS_CONCAT(kiln_statusor_macro_, __LINE__), lhs, expr, ##__VA_ARGS__)

#define KILN_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr, ...)                   \
  auto tmp = (expr);                                                      \
  if (!tmp.ok()) return ::kiln::WithContext(tmp.status(), ##__VA_ARGS__); \
  lhs = *std::move(tmp)
