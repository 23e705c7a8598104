// RETURN_IF_ERROR / ASSIGN_OR_RETURN: they return the error (with context
// when given) and go on otherwise; the context is built only on errors.
#include "common/status_macros.h"

#include <gtest/gtest.h>

#include <memory>

namespace kiln {
namespace {

absl::StatusOr<int> Half(int n) {
  if (n % 2 != 0) return absl::InvalidArgumentError(absl::StrCat(n, " is odd"));
  return n / 2;
}

absl::StatusOr<int> Quarter(int n) {
  ASSIGN_OR_RETURN(int half, Half(n), "halve ", n);
  ASSIGN_OR_RETURN(half, Half(half));
  return half;
}

absl::Status CheckEven(int n, int* calls) {
  ++*calls;
  RETURN_IF_ERROR(Half(n).status());
  return absl::OkStatus();
}

absl::Status CheckBoth(int a, int b, int* calls) {
  RETURN_IF_ERROR_CONTEXT(CheckEven(a, calls), "first number");
  RETURN_IF_ERROR_CONTEXT(CheckEven(b, calls), "second number");
  return absl::OkStatus();
}

TEST(StatusMacros, AssignOrReturnGivesTheValueOrTheErrorWithItsContext) {
  EXPECT_EQ(*Quarter(12), 3);
  absl::Status first = Quarter(7).status();
  EXPECT_EQ(first.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(first.message(), "halve 7: 7 is odd");
  EXPECT_EQ(Quarter(6).status().message(), "3 is odd") << "no context given, none added";
}

TEST(StatusMacros, ReturnIfErrorStopsAtTheFirstError) {
  int calls = 0;
  EXPECT_TRUE(CheckBoth(2, 4, &calls).ok());
  EXPECT_EQ(calls, 2);
  calls = 0;
  absl::Status s = CheckBoth(3, 4, &calls);
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(s.message(), "first number: 3 is odd");
  EXPECT_EQ(CheckBoth(2, 5, &calls).message(), "second number: 5 is odd");
}

TEST(StatusMacros, MoveOnlyValuesAreMovedOut) {
  auto make = []() -> absl::StatusOr<std::unique_ptr<int>> { return std::make_unique<int>(5); };
  auto use = [&]() -> absl::StatusOr<int> {
    ASSIGN_OR_RETURN(std::unique_ptr<int> p, make());
    return *p;
  };
  EXPECT_EQ(*use(), 5);
}

}  // namespace
}  // namespace kiln
