// TokenStore on a real RocksDB and the Authorizer's scope rules: tokens
// verify only with their exact secret, survive a reopen, stop at revocation;
// scopes nest (read < submit < admin) and push patterns bind registry,
// repository and tag.
#include "coordinator/token_store.h"

#include <gtest/gtest.h>

#include "common/image_ref.h"
#include "coordinator/auth.h"
#include "coordinator/rocksdb_state_store.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

using testing::StatusIs;

TEST(TokenStoreTest, OnlyTheExactSecretVerifiesAndRevocationIsImmediate) {
  testing::TempDir dir;
  std::string secret;
  {
    auto store = RocksDbStateStore::Open(dir.Sub("db"), /*sync=*/false);
    ASSERT_TRUE(store.ok()) << store.status();
    auto created = (*store)->tokens()->Create("ci", {"submit", "push:rg.example.eu/team/*:testing"});
    ASSERT_TRUE(created.ok()) << created.status();
    secret = created->secret();
    EXPECT_THAT((*store)->tokens()->Create("ci", {"read"}).status(), StatusIs(absl::StatusCode::kAlreadyExists));
    EXPECT_THAT((*store)->tokens()->Create("bad name", {"read"}).status(),
                StatusIs(absl::StatusCode::kInvalidArgument));
    EXPECT_THAT((*store)->tokens()->Create("x", {}).status(), StatusIs(absl::StatusCode::kInvalidArgument));
    EXPECT_THAT((*store)->tokens()->Create("x", {"push:"}).status(), StatusIs(absl::StatusCode::kInvalidArgument));
  }
  // Reopened: the token still verifies; nothing stored reveals its secret.
  auto store = RocksDbStateStore::Open(dir.Sub("db"), /*sync=*/false);
  ASSERT_TRUE(store.ok()) << store.status();
  TokenStore* tokens = (*store)->tokens();
  auto grant = tokens->Verify(secret);
  ASSERT_TRUE(grant.ok()) << grant.status();
  EXPECT_EQ(grant->name, "ci");
  EXPECT_EQ(grant->scopes.size(), 2u);
  std::string tampered = secret;
  tampered.back() = tampered.back() == 'A' ? 'B' : 'A';
  for (const std::string& wrong : {tampered, secret.substr(0, secret.size() - 1), std::string("kiln_"), std::string(""),
                                   "Bearer " + secret, secret + "x"}) {
    auto refused = tokens->Verify(wrong);
    EXPECT_THAT(refused.status(), StatusIs(absl::StatusCode::kUnauthenticated)) << wrong;
    if (!refused.ok()) {
      EXPECT_EQ(refused.status().message().find(secret.substr(22)), std::string::npos);
    }
  }
  ASSERT_EQ(tokens->List().size(), 1u);
  EXPECT_EQ(tokens->List()[0].name(), "ci");
  ASSERT_TRUE(tokens->Revoke("ci").ok());
  EXPECT_THAT(tokens->Verify(secret).status(), StatusIs(absl::StatusCode::kUnauthenticated));
  EXPECT_THAT(tokens->Revoke("ci").status(), StatusIs(absl::StatusCode::kNotFound));
}

TEST(PushPatternTest, PatternsBindRegistryRepositoryAndTag) {
  EXPECT_TRUE(PushPatternMatches("rg.example.eu/team/*:testing", "rg.example.eu/team/api", "testing"));
  EXPECT_FALSE(PushPatternMatches("rg.example.eu/team/*:testing", "rg.example.eu/team/api", "production"));
  EXPECT_FALSE(PushPatternMatches("rg.example.eu/team/*:testing", "rg.example.eu/other/api", "testing"));
  EXPECT_FALSE(PushPatternMatches("rg.example.eu/team/*:testing", "evil.example/team/api", "testing"));
  // Without a tag part: any tag of the matching repositories.
  EXPECT_TRUE(PushPatternMatches("rg.example.eu/team/*", "rg.example.eu/team/api", "production"));
  // A registry with a port is not mistaken for a tag.
  EXPECT_TRUE(PushPatternMatches("127.0.0.1:5000/kiln/*", "127.0.0.1:5000/kiln/x", "t"));
  EXPECT_TRUE(PushPatternMatches("127.0.0.1:*/kiln/*:testing", "127.0.0.1:5000/kiln/x", "testing"));
  EXPECT_FALSE(PushPatternMatches("127.0.0.1:*/kiln/*:testing", "127.0.0.1:5000/kiln/x", "prod"));
}

// A token scoped to team/* cannot reach another repository through '..'.
TEST(PushPatternTest, ATokenScopeIsNotEscapedByDotDot) {
  testing::TempDir dir;
  auto store = RocksDbStateStore::Open(dir.Sub("db"), /*sync=*/false);
  ASSERT_TRUE(store.ok()) << store.status();
  auto created = (*store)->tokens()->Create("ci", {"submit", "push:127.0.0.1:5998/team/*:testing"});
  ASSERT_TRUE(created.ok()) << created.status();
  Authorizer auth((*store)->tokens(), /*require_tokens=*/true, /*workers_need_certificate=*/false, nullptr);
  Caller caller;
  caller.who = "token 'ci'";
  caller.token = *(*store)->tokens()->Verify(created->secret());
  kiln::v1::PushTarget push;
  push.add_tags("testing");
  push.set_repository("127.0.0.1:5998/team/app");
  EXPECT_TRUE(auth.CheckPush(caller, push).ok());
  push.set_repository("127.0.0.1:5998/team/../prod/app");
  EXPECT_THAT(auth.CheckPush(caller, push), StatusIs(absl::StatusCode::kPermissionDenied));
  push.set_repository("127.0.0.1:5998/team/./../prod/app");
  EXPECT_THAT(auth.CheckPush(caller, push), StatusIs(absl::StatusCode::kPermissionDenied));
  // Scopes are checked by the same grammar when the token is made.
  EXPECT_THAT((*store)->tokens()->Create("bad", {"push:127.0.0.1:5998//x"}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

}  // namespace
}  // namespace kiln
