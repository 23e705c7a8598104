// Pushing a docker-archive built by real Nix to a real registry (Debian's
// docker-registry on 127.0.0.1, behind htpasswd), checked with skopeo, an
// independent client.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <thread>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/digest.h"
#include "common/subprocess.h"
#include "push/docker_archive.h"
#include "push/image_pusher.h"
#include "push/registry_client.h"
#include "tests/support/local_farm.h"
#include "tests/support/local_registry.h"
#include "tests/support/test_util.h"
#include "tests/support/token_issuer.h"

namespace kiln {
namespace {

using testing::LocalRegistry;

constexpr char kUser[] = "kiln";
constexpr char kPassword[] = "s3cret-registry-password";

absl::StatusOr<CommandResult> RunTool(std::vector<std::string> argv) {
  ProcessSpec spec;
  spec.argv = std::move(argv);
  spec.extra_env = testing::NixTestEnv();
  return RunCommand(spec, "", absl::Minutes(3));
}

class PushTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    // The example image, built by real Nix.
    auto built = RunTool({"nix", "build", "--no-link", "--json",
                          "path:" + testing::SourcePath("examples/services/hello-api") + "#oci-image"});
    ASSERT_TRUE(built.ok() && built->exit.Success()) << (built.ok() ? built->stderr_data : "");
    auto j = nlohmann::json::parse(built->stdout_data);
    archive_ = new std::string(j[0]["outputs"]["out"].get<std::string>());
    auto registry = LocalRegistry::Start({kUser, kPassword});
    ASSERT_TRUE(registry.ok()) << registry.status();
    registry_ = registry->release();
  }
  static void TearDownTestSuite() {
    delete registry_;
    delete archive_;
  }

  // Sequential, no cache, scratch files in the test's directory.
  PushOptions Plain(LayerCache* cache = nullptr, bool oci = false) const {
    PushOptions o;
    o.scratch_dir = dir_.path();
    o.cache = cache;
    o.oci_manifest = oci;
    return o;
  }
  RegistryOptions Options(const std::string& password = kPassword) {
    RegistryOptions o;
    o.plain_http = true;
    o.credentials = {kUser, password};
    o.max_attempts = 3;
    return o;
  }
  std::string Skopeo(const std::vector<std::string>& args) {
    std::vector<std::string> argv = {"skopeo"};
    argv.insert(argv.end(), args.begin(), args.end());
    auto r = RunTool(argv);
    EXPECT_TRUE(r.ok() && r->exit.Success()) << (r.ok() ? r->stderr_data : std::string(r.status().message()));
    return r.ok() ? r->stdout_data : "";
  }

  static std::string* archive_;
  static LocalRegistry* registry_;
  testing::TempDir dir_;
};
std::string* PushTest::archive_ = nullptr;
LocalRegistry* PushTest::registry_ = nullptr;

TEST_F(PushTest, ReadsTheDockerArchiveOfTheExample) {
  auto image = ReadDockerArchive(*archive_);
  ASSERT_TRUE(image.ok()) << image.status();
  ASSERT_EQ(image->layers.size(), 2u);
  EXPECT_TRUE(absl::StartsWith(image->layers[0].diff_id, "sha256:"));
  EXPECT_EQ(image->repo_tags, std::vector<std::string>{"hello-api:latest"});
  // The streamed bytes of each layer hash to its diff_id.
  std::vector<std::unique_ptr<Sha256>> hashes;
  for (size_t i = 0; i < image->layers.size(); ++i) hashes.push_back(std::make_unique<Sha256>());
  std::vector<std::string> got(image->layers.size());
  ASSERT_TRUE(StreamLayers(
                  *archive_, *image, [](size_t) { return true; },
                  [&](size_t i, absl::string_view data) {
                    hashes[i]->Update(data);
                    return absl::OkStatus();
                  },
                  [&](size_t i) {
                    got[i] = "sha256:" + hashes[i]->FinishHex();
                    return absl::OkStatus();
                  })
                  .ok());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_EQ(got[i], image->layers[i].diff_id);
  EXPECT_FALSE(ReadDockerArchive(testing::SourcePath("README.md")).ok());
}

TEST_F(PushTest, PushesAnImageSkopeoCanPullThenSkipsEveryBlobTheSecondTime) {
  const std::string repo = absl::StrCat("kiln/hello-api-", absl::ToUnixNanos(absl::Now()));
  auto ref = ParseImageRef(absl::StrCat(registry_->address(), "/", repo, ":testing"));
  ASSERT_TRUE(ref.ok()) << ref.status();
  LayerCache cache(dir_.Sub("layers.json"));
  PushOptions options = Plain(&cache);

  HttpRegistryClient client(registry_->address(), Options());
  auto report = PushDockerArchive(*archive_, *ref, {"testing", "v1"}, client, options);
  ASSERT_TRUE(report.ok()) << report.status();
  ASSERT_EQ(report->layers.size(), 2u);
  for (const auto& l : report->layers) EXPECT_FALSE(l.skipped);
  EXPECT_GT(report->bytes_uploaded, 0u);

  // skopeo sees the same manifest digest under both tags, and can copy the
  // image out (it checks every blob's digest on the way).
  const std::string creds = absl::StrCat(kUser, ":", kPassword);
  for (const char* tag : {"testing", "v1"}) {
    auto j = nlohmann::json::parse(Skopeo({"inspect", "--tls-verify=false", "--creds", creds,
                                           absl::StrCat("docker://", registry_->address(), "/", repo, ":", tag)}),
                                   nullptr, false);
    ASSERT_TRUE(j.is_object());
    EXPECT_EQ(j.value("Digest", ""), report->manifest_digest);
    EXPECT_EQ(j["Layers"].size(), 2u);
  }
  Skopeo({"copy", "--src-tls-verify=false", "--src-creds", creds,
          absl::StrCat("docker://", registry_->address(), "/", repo, ":testing"), "dir:" + dir_.Sub("pulled")});
  // Each pulled layer decompresses to its diff_id.
  auto image = ReadDockerArchive(*archive_);
  ASSERT_TRUE(image.ok());
  for (size_t i = 0; i < report->layers.size(); ++i) {
    const std::string blob = dir_.Sub("pulled/" + report->layers[i].digest.substr(7));
    auto gunzip = RunTool({"gzip", "-dc", blob});
    ASSERT_TRUE(gunzip.ok() && gunzip->exit.Success());
    EXPECT_EQ("sha256:" + Sha256Hex(gunzip->stdout_data), image->layers[i].diff_id);
  }

  // Again, with the layer cache: the manifest is known before anything is
  // read; the tags already name it, so one HEAD per tag is all it takes.
  HttpRegistryClient again_client(registry_->address(), Options());
  auto again = PushDockerArchive(*archive_, *ref, {"testing", "v1"}, again_client, options);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->manifest_digest, report->manifest_digest);
  for (const auto& l : again->layers) EXPECT_TRUE(l.skipped);
  EXPECT_TRUE(again->config.skipped);
  EXPECT_EQ(again->bytes_uploaded, 0u);
  EXPECT_EQ(again_client.requests("HEAD"), 2 + 1);  // The first is sent twice: a 401 asks for credentials.
  EXPECT_EQ(again_client.requests("POST"), 0);
  EXPECT_EQ(again_client.requests("PATCH"), 0);
  EXPECT_EQ(again_client.requests("PUT"), 0);

  // A new tag for the same image: the repository holds the manifest, so it
  // holds every blob; the new tag is the only thing sent.
  HttpRegistryClient tag_client(registry_->address(), Options());
  auto tagged = PushDockerArchive(*archive_, *ref, {"v2"}, tag_client, options);
  ASSERT_TRUE(tagged.ok()) << tagged.status();
  EXPECT_EQ(tagged->manifest_digest, report->manifest_digest);
  EXPECT_EQ(tag_client.requests("HEAD"), 2 + 1);  // The tag (absent), the manifest by digest; the 401.
  EXPECT_EQ(tag_client.requests("PUT"), 1);
  auto j = nlohmann::json::parse(Skopeo({"inspect", "--tls-verify=false", "--creds", creds,
                                         absl::StrCat("docker://", registry_->address(), "/", repo, ":v2")}),
                                 nullptr, false);
  ASSERT_TRUE(j.is_object());
  EXPECT_EQ(j.value("Digest", ""), report->manifest_digest);

  // Another repository without the manifest: every blob is checked as usual.
  HttpRegistryClient other_client(registry_->address(), Options());
  auto other = PushDockerArchive(*archive_, *ParseImageRef(absl::StrCat(registry_->address(), "/", repo, "-b:t")), {},
                                 other_client, options);
  ASSERT_TRUE(other.ok()) << other.status();
  EXPECT_EQ(other->manifest_digest, report->manifest_digest);
  EXPECT_GE(other_client.requests("HEAD"), 2 + 2);  // Tag, manifest, then blobs.
}

TEST_F(PushTest, ASecondRepositoryOfTheRegistryGetsTheLayersByMountNotUpload) {
  const std::string stamp = absl::StrCat(absl::ToUnixNanos(absl::Now()));
  LayerCache cache(dir_.Sub("mount-layers.json"));
  PushOptions options = Plain(&cache);
  HttpRegistryClient first(registry_->address(), Options());
  ASSERT_TRUE(PushDockerArchive(*archive_, *ParseImageRef(absl::StrCat(registry_->address(), "/kiln/a-", stamp, ":t")),
                                {}, first, options)
                  .ok());
  HttpRegistryClient second(registry_->address(), Options());
  const std::string repo = absl::StrCat("kiln/b-", stamp);
  auto report = PushDockerArchive(*archive_, *ParseImageRef(absl::StrCat(registry_->address(), "/", repo, ":t")), {},
                                  second, options);
  ASSERT_TRUE(report.ok()) << report.status();
  for (const auto& l : report->layers) {
    EXPECT_TRUE(l.mounted);
    EXPECT_TRUE(l.skipped);
  }
  EXPECT_EQ(second.requests("PATCH"), 0);
  EXPECT_EQ(second.requests("POST"), 2 + 1);  // Two mounts; the config goes the ordinary way.
  EXPECT_EQ(report->bytes_uploaded, report->config.size);
  Skopeo({"copy", "--src-tls-verify=false", "--src-creds", absl::StrCat(kUser, ":", kPassword),
          absl::StrCat("docker://", registry_->address(), "/", repo, ":t"), "dir:" + dir_.Sub("mounted")});
}

TEST_F(PushTest, LayersCompressedInParallelGiveTheSameImage) {
  const std::string stamp = absl::StrCat(absl::ToUnixNanos(absl::Now()));
  PushOptions sequential = Plain();
  HttpRegistryClient one(registry_->address(), Options());
  auto a = PushDockerArchive(*archive_, *ParseImageRef(absl::StrCat(registry_->address(), "/kiln/seq-", stamp, ":t")),
                             {}, one, sequential);
  ASSERT_TRUE(a.ok()) << a.status();
  PushOptions parallel = sequential;
  parallel.parallel = 3;
  parallel.make_client = [&] { return std::make_unique<HttpRegistryClient>(registry_->address(), Options()); };
  size_t layers_seen = 0;
  uint64_t bytes_seen = 0;
  parallel.on_layer = [&](size_t layers, uint64_t bytes) {
    EXPECT_EQ(layers, layers_seen + 1);  // One call per layer, one at a time.
    layers_seen = layers;
    bytes_seen = bytes;
  };
  HttpRegistryClient main_client(registry_->address(), Options());
  const std::string repo = absl::StrCat("kiln/par-", stamp);
  auto b = PushDockerArchive(*archive_, *ParseImageRef(absl::StrCat(registry_->address(), "/", repo, ":t")), {},
                             main_client, parallel);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->manifest_digest, a->manifest_digest);  // gzip without timestamps: the same bytes.
  EXPECT_EQ(layers_seen, 2u);
  EXPECT_EQ(bytes_seen, b->bytes_uploaded - b->config.size);
  EXPECT_EQ(main_client.requests("PATCH") + main_client.requests("POST"), 1);  // Only the config's upload.
  Skopeo({"copy", "--src-tls-verify=false", "--src-creds", absl::StrCat(kUser, ":", kPassword),
          absl::StrCat("docker://", registry_->address(), "/", repo, ":t"), "dir:" + dir_.Sub("parallel")});
}

TEST_F(PushTest, AnOciManifestOnRequest) {
  const std::string repo = absl::StrCat("kiln/oci-", absl::ToUnixNanos(absl::Now()));
  HttpRegistryClient client(registry_->address(), Options());
  auto report = PushDockerArchive(*archive_, *ParseImageRef(absl::StrCat(registry_->address(), "/", repo, ":oci")), {},
                                  client, Plain(nullptr, /*oci=*/true));
  ASSERT_TRUE(report.ok()) << report.status();
  auto raw = nlohmann::json::parse(
      Skopeo({"inspect", "--raw", "--tls-verify=false", "--creds", absl::StrCat(kUser, ":", kPassword),
              absl::StrCat("docker://", registry_->address(), "/", repo, ":oci")}),
      nullptr, false);
  ASSERT_TRUE(raw.is_object());
  EXPECT_EQ(raw.value("mediaType", ""), "application/vnd.oci.image.manifest.v1+json");
  EXPECT_EQ(raw["layers"][0].value("mediaType", ""), "application/vnd.oci.image.layer.v1.tar+gzip");
  Skopeo({"copy", "--src-tls-verify=false", "--src-creds", absl::StrCat(kUser, ":", kPassword),
          absl::StrCat("docker://", registry_->address(), "/", repo, ":oci"), "oci:" + dir_.Sub("oci-layout")});
}

TEST_F(PushTest, AStreamLayeredImageScriptIsPushedFromItsOutputAsItComes) {
  // streamLayeredImage writes the archive to stdout; this script does the
  // same with tar from the example's unpacked image.
  ASSERT_TRUE(RunTool({"mkdir", "-p", dir_.Sub("unpacked")}).ok());
  auto unpacked = RunTool({"tar", "-C", dir_.Sub("unpacked"), "-xzf", *archive_});
  ASSERT_TRUE(unpacked.ok() && unpacked->exit.Success());
  testing::WriteFileOrDie(dir_.Sub("stream-image"),
                          "#!/bin/sh\nexec tar -C " + dir_.Sub("unpacked") + " --sort=name -cf - .\n");
  ASSERT_EQ(::chmod(dir_.Sub("stream-image").c_str(), 0755), 0);

  const std::string stamp = absl::StrCat(absl::ToUnixNanos(absl::Now()));
  PushOptions options = Plain();
  HttpRegistryClient archive_client(registry_->address(), Options());
  auto from_archive =
      PushImage(*archive_, *ParseImageRef(absl::StrCat(registry_->address(), "/kiln/arch-", stamp, ":t")), {},
                archive_client, options);
  ASSERT_TRUE(from_archive.ok()) << from_archive.status();

  // Every layer streamed in small PATCHes (nothing held, nothing on disk).
  // Its members compressed by a pool of two threads: the same bytes.
  RegistryOptions small = Options();
  small.chunk_bytes = 64;
  options.stream_hold_bytes = 0;
  options.parallel = 2;
  HttpRegistryClient client(registry_->address(), small);
  const std::string repo = absl::StrCat("kiln/stream-", stamp);
  auto streamed = PushImage(dir_.Sub("stream-image"),
                            *ParseImageRef(absl::StrCat(registry_->address(), "/", repo, ":t")), {}, client, options);
  ASSERT_TRUE(streamed.ok()) << streamed.status();
  EXPECT_EQ(streamed->manifest_digest, from_archive->manifest_digest);  // The same image.
  EXPECT_GT(client.requests("PATCH"), 2);
  Skopeo({"copy", "--src-tls-verify=false", "--src-creds", absl::StrCat(kUser, ":", kPassword),
          absl::StrCat("docker://", registry_->address(), "/", repo, ":t"), "dir:" + dir_.Sub("streamed")});

  // A script that fails is an error with its own words.
  testing::WriteFileOrDie(dir_.Sub("broken-image"), "#!/bin/sh\necho 'no layers today' >&2\nexit 3\n");
  ASSERT_EQ(::chmod(dir_.Sub("broken-image").c_str(), 0755), 0);
  auto broken = PushImage(dir_.Sub("broken-image"), *ParseImageRef(absl::StrCat(registry_->address(), "/", repo, ":x")),
                          {}, client, options);
  ASSERT_FALSE(broken.ok());
}

TEST_F(PushTest, LargeBlobsGoInChunks) {
  const std::string repo = absl::StrCat("kiln/chunked-", absl::ToUnixNanos(absl::Now()));
  RegistryOptions o = Options();
  o.monolithic_max_bytes = 100;  // Everything but the config in PATCH chunks.
  o.chunk_bytes = 1000;
  HttpRegistryClient client(registry_->address(), o);
  auto ref = ParseImageRef(absl::StrCat(registry_->address(), "/", repo, ":chunked"));
  ASSERT_TRUE(ref.ok());
  auto report = PushDockerArchive(*archive_, *ref, {}, client, Plain());
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_GT(client.requests("PATCH"), 2);
  Skopeo({"copy", "--src-tls-verify=false", "--src-creds", absl::StrCat(kUser, ":", kPassword),
          absl::StrCat("docker://", registry_->address(), "/", repo, ":chunked"), "dir:" + dir_.Sub("chunked")});
}

TEST_F(PushTest, ALayerOfSeveralGzipMembersDeflatedOrStoredPullsBackToItsDiffId) {
  // A 5.5 MiB layer is compressed as six gzip members: text, deflated, then
  // bytes that do not compress, stored as they are. Every reader of the
  // pulled blob must see one stream that is the layer.
  const std::string img = dir_.Sub("img");
  ASSERT_TRUE(RunTool({"mkdir", "-p", img + "/big", dir_.Sub("files")}).ok());
  std::string text;
  for (uint64_t i = 0; text.size() < (7u << 19); ++i) absl::StrAppend(&text, "line ", i * 2654435761u % 1000003, "\n");
  testing::WriteFileOrDie(dir_.Sub("files/data.txt"), text);
  std::string noise(2u << 20, '\0');
  uint64_t x = 88172645463325252u;  // xorshift64: bytes no compressor can shrink.
  for (char& c : noise) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    c = static_cast<char>(x >> 56);
  }
  testing::WriteFileOrDie(dir_.Sub("files/noise.bin"), noise);
  auto tarred =
      RunTool({"tar", "--sort=name", "--mtime=@1", "-C", dir_.Sub("files"), "-cf", img + "/big/layer.tar", "."});
  ASSERT_TRUE(tarred.ok() && tarred->exit.Success());
  const std::string diff_id = "sha256:" + Sha256Hex(testing::ReadFileOrDie(img + "/big/layer.tar"));
  const std::string config = absl::StrCat(
      R"({"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[")", diff_id, R"("]}})");
  testing::WriteFileOrDie(img + "/config.json", config);
  testing::WriteFileOrDie(img + "/manifest.json", R"([{"Config":"config.json","Layers":["big/layer.tar"]}])");
  auto archived = RunTool({"tar", "-C", img, "-cf", dir_.Sub("big.tar"), "."});
  ASSERT_TRUE(archived.ok() && archived->exit.Success());

  const std::string repo = absl::StrCat("kiln/members-", absl::ToUnixNanos(absl::Now()));
  HttpRegistryClient client(registry_->address(), Options());
  auto report = PushDockerArchive(
      dir_.Sub("big.tar"), *ParseImageRef(absl::StrCat(registry_->address(), "/", repo, ":t")), {}, client, Plain());
  ASSERT_TRUE(report.ok()) << report.status();
  ASSERT_EQ(report->layers.size(), 1u);
  // The members of the one layer compressed in a pool of three threads:
  // the same blob.
  PushOptions pooled = Plain();
  pooled.parallel = 3;
  pooled.make_client = [&] { return std::make_unique<HttpRegistryClient>(registry_->address(), Options()); };
  auto again =
      PushDockerArchive(dir_.Sub("big.tar"), *ParseImageRef(absl::StrCat(registry_->address(), "/", repo, "-pooled:t")),
                        {}, client, pooled);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->layers[0].digest, report->layers[0].digest);
  EXPECT_FALSE(again->layers[0].skipped);  // Another repository: sent, not found.
  // The text shrinks; the noise costs only its framing (5 bytes per 64 KiB).
  EXPECT_LT(report->layers[0].size, text.size() / 2 + noise.size());
  EXPECT_GT(report->layers[0].size, noise.size());
  Skopeo({"copy", "--src-tls-verify=false", "--src-creds", absl::StrCat(kUser, ":", kPassword),
          absl::StrCat("docker://", registry_->address(), "/", repo, ":t"), "dir:" + dir_.Sub("members")});
  const std::string blob = testing::ReadFileOrDie(dir_.Sub("members/" + report->layers[0].digest.substr(7)));
  EXPECT_EQ("sha256:" + Sha256Hex(blob), report->layers[0].digest);
  size_t members = 0;
  for (size_t at = 0; (at = blob.find("\x1f\x8b\x08", at)) != std::string::npos; ++at) ++members;
  EXPECT_GE(members, 6u);
  auto gunzip = RunTool({"gzip", "-dc", dir_.Sub("members/" + report->layers[0].digest.substr(7))});
  ASSERT_TRUE(gunzip.ok() && gunzip->exit.Success());
  EXPECT_EQ("sha256:" + Sha256Hex(gunzip->stdout_data), diff_id);
  // skopeo (Go's gzip) unpacks it into a docker-archive of its own.
  Skopeo({"copy", "--src-tls-verify=false", "--src-creds", absl::StrCat(kUser, ":", kPassword),
          absl::StrCat("docker://", registry_->address(), "/", repo, ":t"),
          "docker-archive:" + dir_.Sub("back.tar") + ":back:latest"});
  auto back = ReadDockerArchive(dir_.Sub("back.tar"));
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_EQ(back->layers.size(), 1u);
  EXPECT_EQ(back->layers[0].diff_id, diff_id);
  ASSERT_TRUE(RunTool({"mkdir", "-p", dir_.Sub("back")}).ok());
  auto unpacked = RunTool({"tar", "-C", dir_.Sub("back"), "-xf", dir_.Sub("back.tar")});
  ASSERT_TRUE(unpacked.ok() && unpacked->exit.Success());
  EXPECT_EQ("sha256:" + Sha256Hex(testing::ReadFileOrDie(dir_.Sub("back/" + back->layers[0].path))), diff_id);

  // Level "fast" (igzip, in the pool): another blob of the same layer, which
  // the registry verified, and which pulls and inflates back to it.
  PushOptions fast = pooled;
  fast.gzip_level = kFastGzip;
  auto quick = PushDockerArchive(
      dir_.Sub("big.tar"), *ParseImageRef(absl::StrCat(registry_->address(), "/", repo, "-fast:t")), {}, client, fast);
  ASSERT_TRUE(quick.ok()) << quick.status();
  EXPECT_NE(quick->layers[0].digest, report->layers[0].digest);
  EXPECT_LT(quick->layers[0].size, text.size() / 2 + noise.size());
  Skopeo({"copy", "--src-tls-verify=false", "--src-creds", absl::StrCat(kUser, ":", kPassword),
          absl::StrCat("docker://", registry_->address(), "/", repo, "-fast:t"), "dir:" + dir_.Sub("fast")});
  const std::string fast_blob = dir_.Sub("fast/" + quick->layers[0].digest.substr(7));
  EXPECT_EQ("sha256:" + Sha256Hex(testing::ReadFileOrDie(fast_blob)), quick->layers[0].digest);
  auto fast_gunzip = RunTool({"gzip", "-dc", fast_blob});
  ASSERT_TRUE(fast_gunzip.ok() && fast_gunzip->exit.Success());
  EXPECT_EQ("sha256:" + Sha256Hex(fast_gunzip->stdout_data), diff_id);
}

TEST_F(PushTest, AWrongPasswordIsAnAuthErrorThatNeverShowsThePassword) {
  const std::string wrong = "not-the-password-4711";
  HttpRegistryClient client(registry_->address(), Options(wrong));
  auto ref = ParseImageRef(absl::StrCat(registry_->address(), "/kiln/denied:testing"));
  ASSERT_TRUE(ref.ok());
  auto report = PushDockerArchive(*archive_, *ref, {}, client, Plain());
  ASSERT_FALSE(report.ok());
  EXPECT_TRUE(absl::IsUnauthenticated(report.status())) << report.status();
  EXPECT_TRUE(absl::StrContains(report.status().message(), "UNAUTHORIZED")) << report.status();
  EXPECT_FALSE(absl::StrContains(report.status().message(), wrong));
  EXPECT_FALSE(absl::StrContains(report.status().message(), kPassword));
}

TEST_F(PushTest, TheBearerFlowGetsTokensTheRegistryVerifiesAndRenewsThem) {
  // The registry trusts tokens signed under the issuer's CA and nothing else.
  auto issuer = testing::TokenIssuer::Start({.username = kUser, .password = kPassword});
  ASSERT_TRUE(issuer.ok()) << issuer.status();
  LocalRegistry::Options ro;
  ro.token = LocalRegistry::Options::Token{(*issuer)->realm(), (*issuer)->service(), (*issuer)->issuer(),
                                           (*issuer)->root_bundle()};
  auto registry = LocalRegistry::Start(ro);
  ASSERT_TRUE(registry.ok()) << registry.status();
  const std::string reg = (*registry)->address();

  LayerCache cache(dir_.Sub("token-layers.json"));
  HttpRegistryClient client(reg, Options());
  auto first = PushDockerArchive(*archive_, *ParseImageRef(reg + "/kiln/tok-a:testing"), {}, client, Plain(&cache));
  ASSERT_TRUE(first.ok()) << first.status() << (*registry)->LogText();
  // One token serves the whole push: fetched once, not per request.
  EXPECT_EQ((*issuer)->tokens_issued(), 1);
  EXPECT_GE(client.requests("HEAD") + client.requests("POST") + client.requests("PUT"), 6);
  EXPECT_THAT((*issuer)->scopes_requested(), ::testing::Contains("repository:kiln/tok-a:pull,push"));
  // skopeo goes through the same token service and finds the image.
  const std::string inspected = Skopeo({"inspect", "--tls-verify=false", "--creds", absl::StrCat(kUser, ":", kPassword),
                                        absl::StrCat("docker://", reg, "/kiln/tok-a:testing")});
  EXPECT_EQ(nlohmann::json::parse(inspected).value("Digest", ""), first->manifest_digest);

  // A mount from another repository needs a token for both: the client asks
  // for what the registry's challenge names.
  HttpRegistryClient second(reg, Options());
  auto mounted = PushDockerArchive(*archive_, *ParseImageRef(reg + "/kiln/tok-b:testing"), {}, second, Plain(&cache));
  ASSERT_TRUE(mounted.ok()) << mounted.status();
  for (const auto& l : mounted->layers) EXPECT_TRUE(l.mounted);
  EXPECT_THAT((*issuer)->scopes_requested(), ::testing::Contains("repository:kiln/tok-a:pull"));

  // The signing key changes: the cached token is refused (401) and a fresh
  // one is fetched without the caller noticing.
  (*issuer)->set_expires_in(1);
  ASSERT_TRUE((*issuer)->Rotate().ok());
  ASSERT_TRUE((*registry)->Restart().ok());
  const int before_rotation = (*issuer)->tokens_issued();
  auto has = client.HasBlob("kiln/tok-a", first->config.digest);
  ASSERT_TRUE(has.ok()) << has.status();
  EXPECT_TRUE(*has);
  EXPECT_EQ((*issuer)->tokens_issued(), before_rotation + 1);

  // That token said it lives one second. The registry would still take it
  // (it allows a minute of clock skew), so only the client's own expiry
  // accounting can make it ask for a new one.
  absl::SleepFor(absl::Milliseconds(1100));
  has = client.HasBlob("kiln/tok-a", first->config.digest);
  ASSERT_TRUE(has.ok()) << has.status();
  EXPECT_TRUE(*has);
  EXPECT_EQ((*issuer)->tokens_issued(), before_rotation + 2);

  // Wrong credentials: the token service refuses them; the error says so and
  // never shows the password.
  const std::string wrong = "not-the-token-password-0815";
  HttpRegistryClient denied(reg, Options(wrong));
  auto refused = PushDockerArchive(*archive_, *ParseImageRef(reg + "/kiln/tok-c:testing"), {}, denied, Plain());
  ASSERT_FALSE(refused.ok());
  EXPECT_TRUE(absl::IsUnauthenticated(refused.status())) << refused.status();
  EXPECT_TRUE(absl::StrContains(refused.status().message(), "UNAUTHORIZED: the token service refused the credentials"))
      << refused.status();
  EXPECT_FALSE(absl::StrContains(refused.status().message(), wrong));
  EXPECT_GE((*issuer)->refusals(), 1);
}

// Passes everything through; runs `after_first_upload` once the first blob
// is in, to take the registry away in the middle of a push.
class InterruptingClient final : public RegistryClient {
 public:
  InterruptingClient(RegistryClient* inner, std::function<void()> after_first_upload)
      : inner_(inner), after_(std::move(after_first_upload)) {}
  absl::StatusOr<bool> HasBlob(const std::string& repo, const std::string& digest) override {
    return inner_->HasBlob(repo, digest);
  }
  absl::Status UploadBlob(const std::string& repo, const std::string& digest, const BlobSource& blob) override {
    absl::Status s = inner_->UploadBlob(repo, digest, blob);
    if (after_) std::exchange(after_, nullptr)();
    return s;
  }
  absl::StatusOr<bool> MountBlob(const std::string& repo, const std::string& digest, const std::string& from) override {
    return inner_->MountBlob(repo, digest, from);
  }
  absl::StatusOr<std::unique_ptr<BlobStream>> StartStream(const std::string& repo) override {
    return inner_->StartStream(repo);
  }
  absl::StatusOr<std::string> PutManifest(const std::string& repo, const std::string& ref, const std::string& type,
                                          const std::string& body) override {
    return inner_->PutManifest(repo, ref, type, body);
  }

 private:
  RegistryClient* inner_;
  std::function<void()> after_;
};

TEST_F(PushTest, ARegistryBackWithinTheRetriesGetsTheWholeImage) {
  auto own = LocalRegistry::Start({kUser, kPassword});
  ASSERT_TRUE(own.ok()) << own.status();
  RegistryOptions o = Options();
  o.max_attempts = 10;
  o.max_backoff = absl::Seconds(1);
  HttpRegistryClient http((*own)->address(), o);
  std::thread restart;
  InterruptingClient client(&http, [&] {
    (*own)->Stop();
    restart = std::thread([&] {
      absl::SleepFor(absl::Milliseconds(500));
      ASSERT_TRUE((*own)->Restart().ok());
    });
  });
  auto ref = ParseImageRef(absl::StrCat((*own)->address(), "/kiln/flaky:testing"));
  auto report = PushDockerArchive(*archive_, *ref, {}, client, Plain());
  if (restart.joinable()) restart.join();
  ASSERT_TRUE(report.ok()) << report.status();
  Skopeo({"inspect", "--tls-verify=false", "--creds", absl::StrCat(kUser, ":", kPassword),
          absl::StrCat("docker://", (*own)->address(), "/kiln/flaky:testing")});
}

TEST_F(PushTest, ARegistryThatStaysDownIsAClearFailureAfterBoundedRetries) {
  auto own = LocalRegistry::Start({kUser, kPassword});
  ASSERT_TRUE(own.ok()) << own.status();
  RegistryOptions o = Options();
  o.max_attempts = 3;
  o.max_backoff = absl::Milliseconds(200);
  absl::Mutex retries_mu;
  std::vector<std::string> retries;
  o.on_retry = [&](absl::string_view line) {
    absl::MutexLock lock(&retries_mu);
    retries.emplace_back(line);
  };
  HttpRegistryClient http((*own)->address(), o);
  InterruptingClient client(&http, [&] { (*own)->Stop(); });
  auto ref = ParseImageRef(absl::StrCat((*own)->address(), "/kiln/gone:testing"));
  const absl::Time start = absl::Now();
  auto report = PushDockerArchive(*archive_, *ref, {}, client, Plain());
  ASSERT_FALSE(report.ok());
  EXPECT_TRUE(absl::IsUnavailable(report.status())) << report.status();
  EXPECT_TRUE(absl::StrContains(report.status().message(), "after 3 attempts")) << report.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(30));
  // Each retry was said, for the job's log.
  absl::MutexLock lock(&retries_mu);
  ASSERT_GE(retries.size(), 2u);
  EXPECT_TRUE(absl::StrContains(retries[0], "retrying in")) << retries[0];
  EXPECT_TRUE(absl::StrContains(retries[0], "(attempt 2 of 3)")) << retries[0];
  for (const std::string& line : retries) EXPECT_FALSE(absl::StrContains(line, kPassword)) << line;
}

TEST_F(PushTest, AnHttpsRegistryIsTrustedThroughItsCaOnly) {
  auto tls = LocalRegistry::Start({.username = kUser, .password = kPassword, .tls = true});
  ASSERT_TRUE(tls.ok()) << tls.status();
  auto ref = ParseImageRef(absl::StrCat((*tls)->address(), "/kiln/tls:testing"));
  PushOptions options = Plain();
  RegistryOptions o = Options();
  o.plain_http = false;
  o.max_attempts = 2;
  // Without the CA the certificate is not trusted: a clear failure, no retry storm.
  HttpRegistryClient untrusted((*tls)->address(), o);
  auto refused = PushDockerArchive(*archive_, *ref, {}, untrusted, options);
  ASSERT_FALSE(refused.ok());
  EXPECT_TRUE(absl::StrContains(refused.status().message(), "certificate")) << refused.status();
  EXPECT_TRUE(absl::IsFailedPrecondition(refused.status())) << refused.status();
  EXPECT_EQ(untrusted.requests("HEAD"), 1);  // Not retried.
  o.ca_file = (*tls)->ca_file();
  HttpRegistryClient trusted((*tls)->address(), o);
  auto report = PushDockerArchive(*archive_, *ref, {}, trusted, options);
  ASSERT_TRUE(report.ok()) << report.status();
  auto j = nlohmann::json::parse(
      Skopeo({"inspect", "--cert-dir", (*tls)->ca_dir(), "--creds", absl::StrCat(kUser, ":", kPassword),
              absl::StrCat("docker://", (*tls)->address(), "/kiln/tls:testing")}),
      nullptr, false);
  ASSERT_TRUE(j.is_object());
  EXPECT_EQ(j.value("Digest", ""), report->manifest_digest);
}

TEST(ImageRefTest, ParsesAndRefuses) {
  auto ref = ParseImageRef("rg.fr-par.scw.cloud/sanmarcsoft/svc:testing");
  ASSERT_TRUE(ref.ok());
  EXPECT_EQ(ref->registry, "rg.fr-par.scw.cloud");
  EXPECT_EQ(ref->repository, "sanmarcsoft/svc");
  EXPECT_EQ(ref->tag, "testing");
  auto port = ParseImageRef("127.0.0.1:5000/a/b");
  ASSERT_TRUE(port.ok());
  EXPECT_EQ(port->registry, "127.0.0.1:5000");
  EXPECT_EQ(port->tag, "");
  EXPECT_FALSE(ParseImageRef("svc:testing").ok());
  EXPECT_FALSE(ParseImageRef("host/Upper/case").ok());
  EXPECT_FALSE(ParseImageRef("host/a@sha256:abc").ok());
  EXPECT_FALSE(ParseImageRef("host/a:bad tag").ok());
}

}  // namespace
}  // namespace kiln
