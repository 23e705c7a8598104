// The coordinator's computed metrics: RPC labels stay within the methods the
// server implements, and the state database's figures come from a real
// RocksDB.
#include "coordinator/server_metrics.h"

#include <gtest/gtest.h>

#include <prometheus/text_serializer.h>

#include "absl/strings/match.h"
#include "common/digest.h"
#include "kiln/v1/builds.pb.h"
#include "tests/support/test_util.h"

namespace kiln {
namespace {

std::string Serialize(const prometheus::Collectable& collectable) {
  return prometheus::TextSerializer().Serialize(collectable.Collect());
}

TEST(GrpcServerMetricsTest, LabelsKnownMethodsAndFoldsEverythingElse) {
  // The server links its services' descriptors; so does this test.
  ASSERT_NE(kiln::v1::SubmitBuildRequest::descriptor(), nullptr);
  prometheus::Registry registry;
  GrpcServerMetrics metrics(registry);
  metrics.Record("/kiln.v1.BuildService/SubmitBuild", grpc::StatusCode::OK, 0.002);
  metrics.Record("/kiln.v1.BuildService/SubmitBuild", grpc::StatusCode::PERMISSION_DENIED, 0.001);
  metrics.Record("/grpc.health.v1.Health/Check", grpc::StatusCode::OK, 0.001);
  // Names a caller made up: one "unknown" series, however many there are.
  metrics.Record("/kiln.v1.BuildService/Minted1", grpc::StatusCode::UNIMPLEMENTED, 0.001);
  metrics.Record("/evil.Service/Minted2", grpc::StatusCode::UNIMPLEMENTED, 0.001);
  metrics.Record("garbage", grpc::StatusCode::UNIMPLEMENTED, 0.001);
  metrics.Record(nullptr, grpc::StatusCode::UNIMPLEMENTED, 0.001);
  const std::string text = Serialize(registry);
  EXPECT_TRUE(absl::StrContains(text,
                                "kiln_grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"SubmitBuild\","
                                "grpc_service=\"kiln.v1.BuildService\"} 1"))
      << text;
  EXPECT_TRUE(absl::StrContains(text, "grpc_code=\"PermissionDenied\",grpc_method=\"SubmitBuild\"")) << text;
  EXPECT_TRUE(absl::StrContains(text, "grpc_method=\"Check\",grpc_service=\"grpc.health.v1.Health\"")) << text;
  EXPECT_TRUE(absl::StrContains(text,
                                "kiln_grpc_server_handled_total{grpc_code=\"Unimplemented\","
                                "grpc_method=\"unknown\",grpc_service=\"unknown\"} 4"))
      << text;
  EXPECT_FALSE(absl::StrContains(text, "Minted")) << text;
  EXPECT_FALSE(absl::StrContains(text, "evil")) << text;
  EXPECT_TRUE(absl::StrContains(
      text,
      "kiln_grpc_server_handling_seconds_count{grpc_method=\"SubmitBuild\",grpc_service=\"kiln.v1.BuildService\"} 2"))
      << text;
}

TEST(StateStoreCollectorTest, ReadsSizesFromTheDatabase) {
  testing::TempDir dir;
  auto store = RocksDbStateStore::Open(dir.path(), /*sync=*/false);
  ASSERT_TRUE(store.ok()) << store.status();
  StateStoreCollector collector(store->get());
  const std::string empty = Serialize(collector);
  EXPECT_TRUE(absl::StrContains(empty, "kiln_rocksdb_writes_stopped 0")) << empty;
  EXPECT_TRUE(absl::StrContains(empty, "kiln_rocksdb_write_stalls_total{kind=\"stop\"} 0")) << empty;
  EXPECT_TRUE(absl::StrContains(empty, "# TYPE kiln_rocksdb_write_stalls_total counter")) << empty;

  // A megabyte of blobs lands in the memtables first.
  StateWrite write;
  for (int i = 0; i < 16; ++i) {
    std::string blob(64 << 10, static_cast<char>('a' + i));
    write.blobs.emplace_back(Sha256Hex(blob), std::move(blob));
  }
  ASSERT_TRUE((*store)->Commit(write).ok());
  const RocksDbStateStore::Stats stats = (*store)->GetStats();
  EXPECT_GT(stats.memtable_bytes + stats.sst_bytes, uint64_t{1} << 20);
  EXPECT_FALSE(stats.writes_stopped);
}

}  // namespace
}  // namespace kiln
