// Helpers shared by Kiln's tests (no tests in here).
#pragma once

#include <string>
#include <vector>

#include <gmock/gmock.h>

#include "absl/strings/match.h"

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kiln/v1/builds.pb.h"

namespace kiln::testing {

// A fresh directory under $TMPDIR, removed with its contents on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string Sub(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

std::string ReadFileOrDie(const std::string& path);
void WriteFileOrDie(const std::string& path, const std::string& contents);

// Path of a file under the source tree (KILN_SOURCE_DIR, set by CTest).
std::string SourcePath(const std::string& relative);

// Compares `actual` with the golden file at `relative` (under the source
// tree); with KILN_UPDATE_GOLDEN=1 in the environment, rewrites it instead.
void ExpectMatchesGolden(const std::string& actual, const std::string& relative);

// A submission of one target per name in `attrs`, each of the same one-file
// flake (flake.nix holding `flake`), whose blobs ride along; for `system`.
kiln::v1::SubmitBuildRequest OneFileFlakeSubmission(const std::string& flake, const std::vector<std::string>& attrs,
                                                    const std::string& system = "x86_64-linux");

// What `outputHash = lib.fakeHash` declares.
inline constexpr char kFakeSha256Sri[] = "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

// The SRI SHA-256 of `content`: what a flat FOD writing exactly it declares.
std::string Sha256SriOf(const std::string& content);

// A flake whose default package is one derivation named `name` that runs
// `script` with /bin/sh (it must write $out); `script` lands inside a Nix
// string, so it quotes `"` as `\"`.
std::string ShellFlake(const std::string& name, const std::string& script);

// A tmpfs of `size` (e.g. "20m") mounted at `path` (which must exist) for
// this object's lifetime: a small disk for a daemon to fill. Unmounted lazily
// (MNT_DETACH), as the daemon may still hold files on it. Needs root.
class ScopedTmpfs {
 public:
  ScopedTmpfs(std::string path, const std::string& size);
  ~ScopedTmpfs();
  ScopedTmpfs(const ScopedTmpfs&) = delete;
  ScopedTmpfs& operator=(const ScopedTmpfs&) = delete;
  const absl::Status& status() const { return status_; }

 private:
  std::string path_;
  absl::Status status_;
};

MATCHER_P(StatusIs, code, "") { return arg.code() == code; }
MATCHER_P(StatusOrIs, code, "") { return arg.status().code() == code; }
// A status with `code` whose message contains `text`.
MATCHER_P2(StatusIs, code, text, "") {
  return arg.code() == code && absl::StrContains(arg.message(), std::string(text));
}

}  // namespace kiln::testing
