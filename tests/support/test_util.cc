#include "tests/support/test_util.h"

#include <sys/mount.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <gtest/gtest.h>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "common/digest.h"
#include "common/nix_hash.h"
#include "common/source_tree.h"

namespace kiln::testing {
namespace fs = std::filesystem;

TempDir::TempDir() {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base && *base ? base : "/tmp") + "/kiln-test-XXXXXX";
  char* made = ::mkdtemp(tmpl.data());
  if (made == nullptr) std::abort();
  path_ = made;
}

TempDir::~TempDir() {
  std::error_code ec;
  fs::remove_all(path_, ec);
}

std::string ReadFileOrDie(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    ADD_FAILURE() << "cannot read " << path;
    return "";
  }
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteFileOrDie(const std::string& path, const std::string& contents) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << contents;
  if (!out) std::abort();
}

std::string SourcePath(const std::string& relative) {
  const char* root = std::getenv("KILN_SOURCE_DIR");
  return std::string(root ? root : ".") + "/" + relative;
}

void ExpectMatchesGolden(const std::string& actual, const std::string& relative) {
  const std::string path = SourcePath(relative);
  const char* update = std::getenv("KILN_UPDATE_GOLDEN");
  if (update && std::string(update) == "1") {
    WriteFileOrDie(path, actual);
    return;
  }
  EXPECT_EQ(actual, ReadFileOrDie(path)) << "golden file " << relative
                                         << " differs; rerun with KILN_UPDATE_GOLDEN=1 if the change is intended";
}

kiln::v1::SubmitBuildRequest OneFileFlakeSubmission(const std::string& flake, const std::vector<std::string>& attrs,
                                                    const std::string& system) {
  kiln::v1::SubmitBuildRequest request;
  kiln::v1::Directory root;
  auto* file = root.add_files();
  file->set_name("flake.nix");
  *file->mutable_digest() = DigestOf(flake);
  const std::string root_blob = SerializeDirectory(root);
  for (const std::string& data : {flake, root_blob}) {
    auto* blob = request.add_blobs();
    *blob->mutable_digest() = DigestOf(data);
    blob->set_data(data);
  }
  for (const std::string& attr : attrs) {
    auto* spec = request.add_targets()->mutable_spec();
    *spec->mutable_source()->mutable_tree_root() = DigestOf(root_blob);
    spec->set_attr(attr);
    spec->mutable_requirements()->set_system(system);
  }
  return request;
}

std::string Sha256SriOf(const std::string& content) {
  NixHash h;
  h.bytes = absl::HexStringToBytes(Sha256Hex(content));
  return h.Sri();
}

std::string ShellFlake(const std::string& name, const std::string& script) {
  return absl::StrReplaceAll(R"({
  outputs = { self }: {
    packages.x86_64-linux.default = derivation {
      name = "NAME"; system = "x86_64-linux"; builder = "/bin/sh";
      args = [ "-c" "SCRIPT" ];
    };
  };
})",
                             {{"NAME", name}, {"SCRIPT", script}});
}

ScopedTmpfs::ScopedTmpfs(std::string path, const std::string& size) : path_(std::move(path)) {
  const std::string options = absl::StrCat("size=", size);
  if (::mount("tmpfs", path_.c_str(), "tmpfs", 0, options.c_str()) != 0) {
    status_ = absl::InternalError(absl::StrCat("cannot mount a tmpfs at ", path_, ": ", std::strerror(errno)));
  }
}

ScopedTmpfs::~ScopedTmpfs() {
  if (status_.ok()) ::umount2(path_.c_str(), MNT_DETACH);
}

}  // namespace kiln::testing
