// The CAS: CasStore on a real RocksDB, and CasService with the client
// (UploadTree, FetchBlobs) over an in-process gRPC channel.
#include <sys/stat.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <memory>
#include <thread>

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

#include "common/cas_client.h"
#include "common/source_tree.h"
#include "coordinator/cas_service.h"
#include "coordinator/rocksdb_state_store.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

using kiln::v1::Digest;
using kiln::v1::Directory;
using testing::StatusIs;

class CasTest : public ::testing::Test {
 protected:
  void SetUp() override { Reopen(); }
  void Reopen() {
    store_.reset();
    auto store = RocksDbStateStore::Open((std::filesystem::path(dir_.path()) / "db").string(), false,
                                         /*max_blob_bytes=*/8 << 20);
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = *std::move(store);
  }
  CasStore& cas() { return *store_->cas(); }
  std::filesystem::path PackPath(uint64_t pack) const {
    return std::filesystem::path(dir_.path()) / "db" / "cas" / "packs" / absl::StrCat(pack, ".pack");
  }
  // Bytes of distinct content (no two calls with different seeds agree).
  static std::string Bytes(size_t n, int seed) {
    std::string out(n, '\0');
    for (size_t i = 0; i < n; ++i) out[i] = static_cast<char>((i * 131 + i / 251) ^ (seed * 7919));
    return out;
  }

  // Stores a directory with these files (name -> content) and returns it.
  Digest PutDirectory(const std::vector<std::pair<std::string, std::string>>& files,
                      const std::vector<std::pair<std::string, Digest>>& dirs = {},
                      const std::vector<std::pair<std::string, std::string>>& links = {}) {
    Directory d;
    for (const auto& [name, data] : files) {
      auto* f = d.add_files();
      f->set_name(name);
      *f->mutable_digest() = DigestOf(data);
      EXPECT_TRUE(cas().Put(DigestOf(data), data, false).ok());
    }
    for (const auto& [name, digest] : dirs) {
      auto* c = d.add_directories();
      c->set_name(name);
      *c->mutable_digest() = digest;
    }
    for (const auto& [name, target] : links) {
      auto* l = d.add_symlinks();
      l->set_name(name);
      l->set_target(target);
    }
    const std::string blob = SerializeDirectory(d);
    absl::Status s = cas().Put(DigestOf(blob), blob, true);
    EXPECT_TRUE(s.ok()) << s;
    return DigestOf(blob);
  }

  testing::TempDir dir_;
  std::unique_ptr<RocksDbStateStore> store_;
};

TEST_F(CasTest, StoresVerifiedBlobsAndRejectsWrongOnesStoringNothing) {
  const std::string data = "hello, cas";
  ASSERT_TRUE(cas().Put(DigestOf(data), data, false).ok());
  EXPECT_TRUE(cas().HasFile(DigestOf(data)));
  EXPECT_EQ(*cas().ReadAll(DigestOf(data).hash()), data);

  const Digest claimed = DigestOf("what the client said");
  EXPECT_THAT(cas().Put(claimed, std::string("something else entirely").substr(0, claimed.size_bytes()), false),
              StatusIs(absl::StatusCode::kInvalidArgument, "does not match its digest"));
  EXPECT_FALSE(cas().HasFile(claimed));
  EXPECT_TRUE(absl::IsNotFound(cas().Meta(claimed.hash()).status()));

  Digest not_hex;
  not_hex.set_hash("../../etc/passwd");
  not_hex.set_size_bytes(1);
  EXPECT_EQ(cas().Put(not_hex, "x", false).code(), absl::StatusCode::kInvalidArgument);
  const std::string big(9 << 20, 'b');
  EXPECT_THAT(cas().Put(DigestOf(big), big, false), StatusIs(absl::StatusCode::kResourceExhausted, "over the limit"));
}

TEST_F(CasTest, LargeBlobsAreFilesReadBackInChunks) {
  std::string big(3 * CasStore::kChunkBytes + 12345, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 7 + i / 4096);
  ASSERT_TRUE(cas().Put(DigestOf(big), big, false).ok());
  auto meta = cas().Meta(DigestOf(big).hash());
  ASSERT_TRUE(meta.ok());
  EXPECT_TRUE(meta->in_file());
  size_t pieces = 0;
  std::string back;
  ASSERT_TRUE(cas()
                  .Read(DigestOf(big).hash(),
                        [&](absl::string_view chunk) {
                          ++pieces;
                          EXPECT_LE(chunk.size(), CasStore::kChunkBytes);
                          back.append(chunk.data(), chunk.size());
                          return absl::OkStatus();
                        })
                  .ok());
  EXPECT_EQ(pieces, 4u);
  EXPECT_EQ(back, big);
  // The same content again is not stored twice.
  auto again = cas().StartUpload(DigestOf(big), false);
  ASSERT_TRUE(again.ok());
  ASSERT_TRUE((*again)->Append(big).ok());
  ASSERT_TRUE((*again)->Finish().ok());
  EXPECT_TRUE((*again)->already_present());

  // A large upload that fails its digest check leaves no file behind.
  std::string forged = big;
  forged[100] ^= 1;
  EXPECT_EQ(cas().Put(DigestOf(big), forged, false).code(), absl::StatusCode::kInvalidArgument);
  const std::filesystem::path tmp = std::filesystem::path(dir_.path()) / "db" / "cas" / "tmp";
  EXPECT_TRUE(std::filesystem::is_empty(tmp));
  EXPECT_EQ(*cas().ReadAll(DigestOf(big).hash()), big);  // The stored copy is untouched.
}

TEST_F(CasTest, SmallFilesArePackedAndCollectionPunchesThemOutThenDeletesEmptyPacks) {
  namespace fs = std::filesystem;
  const std::string a = Bytes(20000, 1), b = Bytes(20000, 2), c = Bytes(20000, 3);
  for (const std::string* blob : {&a, &b, &c}) ASSERT_TRUE(cas().Put(DigestOf(*blob), *blob, false).ok());
  auto meta_a = cas().Meta(DigestOf(a).hash());
  auto meta_c = cas().Meta(DigestOf(c).hash());
  ASSERT_TRUE(meta_a.ok() && meta_c.ok());
  const uint64_t first_pack = meta_a->pack();
  EXPECT_NE(first_pack, 0u);
  EXPECT_FALSE(meta_a->in_file());
  EXPECT_EQ(meta_c->pack(), first_pack);
  EXPECT_EQ(meta_c->pack_offset(), 40000u);  // Appended in order.
  EXPECT_EQ(fs::file_size(PackPath(first_pack)), 60000u);

  // After a restart the blobs read back, and new ones go to a new pack.
  Reopen();
  EXPECT_EQ(cas().total_bytes(), 60000u);
  EXPECT_EQ(*cas().ReadAll(DigestOf(b).hash()), b);
  const std::string d = Bytes(30000, 4);
  ASSERT_TRUE(cas().Put(DigestOf(d), d, false).ok());
  EXPECT_NE(cas().Meta(DigestOf(d).hash())->pack(), first_pack);

  // Collecting a and c punches their ranges out; b, between them, is intact.
  const auto blocks_of = [&](uint64_t pack) {
    struct stat st;
    EXPECT_EQ(::stat(PackPath(pack).c_str(), &st), 0);
    return static_cast<uint64_t>(st.st_blocks) * 512;
  };
  const uint64_t before = blocks_of(first_pack);
  const int64_t later = absl::ToUnixSeconds(absl::Now()) + 10;
  auto freed = cas().CollectGarbage({DigestOf(b).hash(), DigestOf(d).hash()}, later, 0);
  ASSERT_TRUE(freed.ok()) << freed.status();
  EXPECT_EQ(*freed, 40000u);
  EXPECT_FALSE(cas().HasFile(DigestOf(a)));
  EXPECT_FALSE(cas().HasFile(DigestOf(c)));
  EXPECT_EQ(*cas().ReadAll(DigestOf(b).hash()), b);
  EXPECT_LE(blocks_of(first_pack) + 32768, before);  // Whole blocks of a and c gone.
  // Once b goes too, the pack goes.
  ASSERT_TRUE(cas().CollectGarbage({DigestOf(d).hash()}, later, 0).ok());
  EXPECT_FALSE(fs::exists(PackPath(first_pack)));
  EXPECT_EQ(*cas().ReadAll(DigestOf(d).hash()), d);
  EXPECT_EQ(cas().total_bytes(), d.size());
}

TEST_F(CasTest, ConcurrentUploadsOfOneSmallBlobPackItOnce) {
  const std::string blob = Bytes(30000, 5);
  std::vector<std::thread> threads;
  std::atomic<int> stored{0}, failed{0};
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 50; ++i) {
        bool was_new = false;
        if (!cas().Put(DigestOf(blob), blob, false, &was_new).ok()) ++failed;
        if (was_new) ++stored;
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(failed.load(), 0);
  EXPECT_EQ(stored.load(), 1);
  auto meta = cas().Meta(DigestOf(blob).hash());
  ASSERT_TRUE(meta.ok());
  EXPECT_EQ(std::filesystem::file_size(PackPath(meta->pack())), blob.size());
  EXPECT_EQ(cas().total_bytes(), blob.size());
}

TEST_F(CasTest, ADirectoryIsAcceptedOnlyAfterItsChildrenAndSummarisesItsTree) {
  // A directory naming a file the CAS does not have is refused.
  Directory orphan;
  auto* f = orphan.add_files();
  f->set_name("missing.txt");
  *f->mutable_digest() = DigestOf("never uploaded");
  const std::string orphan_blob = SerializeDirectory(orphan);
  EXPECT_THAT(cas().Put(DigestOf(orphan_blob), orphan_blob, true),
              StatusIs(absl::StatusCode::kFailedPrecondition, "upload files before directories"));
  EXPECT_FALSE(cas().HasDirectory(DigestOf(orphan_blob)));

  const Digest lib = PutDirectory({{"a.nix", "a"}, {"b.nix", "bb"}}, {}, {{"up", "../flake.nix"}});
  const Digest root = PutDirectory({{"flake.nix", "{ }"}}, {{"lib", lib}});
  auto meta = cas().Meta(root.hash());
  ASSERT_TRUE(meta.ok());
  EXPECT_TRUE(meta->is_directory());
  EXPECT_EQ(meta->tree_entries(), 5);  // flake.nix, lib, a.nix, b.nix, up
  EXPECT_EQ(meta->tree_depth(), 1u);
  EXPECT_EQ(meta->link_escape(), 0);  // lib/up -> ../flake.nix stays inside.
  EXPECT_EQ(meta->tree_bytes(), root.size_bytes() + lib.size_bytes() + 3 + 1 + 2);
  // The same link one level higher leaves the tree.
  const Digest escaping = PutDirectory({{"flake.nix", "{ }"}}, {}, {{"up", "../flake.nix"}});
  EXPECT_EQ(cas().Meta(escaping.hash())->link_escape(), 1);

  // A directory blob must be canonical: the same entries, unsorted, are not.
  Directory unsorted;
  for (const char* name : {"b.nix", "a.nix"}) {
    auto* file = unsorted.add_files();
    file->set_name(name);
    *file->mutable_digest() = DigestOf(name[0] == 'a' ? "a" : "bb");
  }
  const std::string unsorted_blob = SerializeDirectory(unsorted);
  EXPECT_EQ(cas().Put(DigestOf(unsorted_blob), unsorted_blob, true).code(), absl::StatusCode::kInvalidArgument);
}

// CasService on an in-process channel, driven by the client library.
class CasServiceTest : public CasTest {
 protected:
  void SetUp() override {
    CasTest::SetUp();
    service_ = std::make_unique<CasServiceImpl>(store_->cas(), &metrics_);
    grpc::ServerBuilder builder;
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    stub_ = kiln::v1::CasService::NewStub(server_->InProcessChannel(grpc::ChannelArguments()));
  }
  void TearDown() override { server_->Shutdown(); }

  void Write(const std::string& rel, const std::string& data) {
    const std::filesystem::path p = std::filesystem::path(src_.path()) / rel;
    std::filesystem::create_directories(p.parent_path());
    std::ofstream(p, std::ios::binary) << data;
  }
  SourceTree Build() {
    auto tree = BuildSourceTree(src_.path(), {}, {.keep_file_data = false});
    EXPECT_TRUE(tree.ok()) << tree.status();
    return *std::move(tree);
  }

  testing::TempDir src_;
  CoordinatorMetrics metrics_{std::make_shared<prometheus::Registry>()};
  std::unique_ptr<CasServiceImpl> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<kiln::v1::CasService::Stub> stub_;
};

TEST_F(CasServiceTest, AnUnchangedTreeCostsOneDigestAndAOneFileChangeOnlyItsPath) {
  Write("flake.nix", "{ outputs = _: { }; }");
  for (int s = 0; s < 5; ++s) {
    for (int f = 0; f < 20; ++f) Write(absl::StrCat("services/s", s, "/src/f", f, ".txt"), absl::StrCat(s, "-", f));
  }
  SourceTree tree = Build();
  UploadStats first;
  ASSERT_TRUE(UploadTree(*stub_, tree, &first).ok());
  EXPECT_EQ(first.blobs_sent, 100 + 1 + 1 + 5 + 5 + 1);  // files, flake.nix, root, services, s*, s*/src
  EXPECT_TRUE(cas().HasDirectory(tree.root));

  UploadStats again;
  ASSERT_TRUE(UploadTree(*stub_, Build(), &again).ok());
  EXPECT_EQ(again.blobs_sent, 0u);
  EXPECT_EQ(again.round_trips, 1u);
  EXPECT_EQ(again.digests_asked, 1u);

  Write("services/s3/src/f7.txt", "changed");
  SourceTree changed = Build();
  UploadStats one;
  ASSERT_TRUE(UploadTree(*stub_, changed, &one).ok());
  // The file, then src, s3, services and the root.
  EXPECT_EQ(one.blobs_sent, 5u);
  uint64_t path_bytes = 7;  // The file, and the four directories on its path.
  for (const auto& [hash, data] : changed.blobs) {
    if (!tree.blobs.contains(hash)) path_bytes += data.size();
  }
  EXPECT_EQ(one.bytes_sent, path_bytes);
  EXPECT_TRUE(cas().HasDirectory(changed.root));

  // A worker gets every directory in one call, and the files it asks for.
  grpc::ClientContext context;
  kiln::v1::GetTreeRequest request;
  *request.mutable_root() = changed.root;
  kiln::v1::GetTreeResponse response;
  ASSERT_TRUE(stub_->GetTree(&context, request, &response).ok());
  EXPECT_EQ(response.directories_size(), 1 + 1 + 5 + 5);
  EXPECT_EQ(response.directories(0).digest().hash(), changed.root.hash());
  std::vector<Digest> want = {DigestOf("changed"), DigestOf("1-2")};
  std::vector<std::string> got;
  ASSERT_TRUE(FetchBlobs(*stub_, want, [&](const Digest&, std::string&& data) {
                got.push_back(data);
                return absl::OkStatus();
              }).ok());
  EXPECT_EQ(got, (std::vector<std::string>{"changed", "1-2"}));
}

TEST_F(CasServiceTest, ATamperedUploadIsRejectedAndNothingIsStored) {
  const std::string real = "the real content";
  const Digest digest = DigestOf(real);
  grpc::ClientContext context;
  kiln::v1::WriteBlobsResponse response;
  auto writer = stub_->WriteBlobs(&context, &response);
  kiln::v1::WriteBlobsChunk chunk;
  *chunk.mutable_digest() = digest;
  chunk.set_data(std::string("the fake content"));  // Same length, other bytes.
  chunk.set_last(true);
  writer->Write(chunk);
  writer->WritesDone();
  grpc::Status status = writer->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("does not match its digest"), std::string::npos) << status.error_message();
  EXPECT_FALSE(cas().HasFile(digest));
  EXPECT_EQ(metrics_.cas_rejected_blobs.Value(), 1);

  // A blob that is not there cannot be read.
  EXPECT_TRUE(
      absl::IsNotFound(FetchBlobs(*stub_, {digest}, [](const Digest&, std::string&&) { return absl::OkStatus(); })));
}

}  // namespace
}  // namespace kiln
