#include "coordinator/rocksdb_state_store.h"

#include <cstdarg>
#include <cstdio>
#include <filesystem>
#include <map>

#include <rocksdb/options.h>
#include <rocksdb/utilities/checkpoint.h>
#include <rocksdb/table.h>
#include <rocksdb/write_batch.h>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/clock.h"
#include "common/log.h"
#include "coordinator/rocks_status.h"

namespace kiln {
namespace {

// RocksDB's informational log, sent to Kiln's (stderr, the journal) instead
// of a LOG file in the state directory: on a full disk a failed write to
// that file leaves its writer in an error state, and RocksDB's next message
// (DB::Resume() writes one first thing) then fails an assertion, which
// Debian's RocksDB keeps: the coordinator aborted when space came back.
// Warnings and errors only: the rest is RocksDB's own bookkeeping.
class RocksDbLogToKilnLog final : public rocksdb::Logger {
 public:
  RocksDbLogToKilnLog() : rocksdb::Logger(rocksdb::InfoLogLevel::WARN_LEVEL) {}
  void Logv(const char* format, va_list ap) override { Logv(rocksdb::InfoLogLevel::INFO_LEVEL, format, ap); }
  void Logv(const rocksdb::InfoLogLevel level, const char* format, va_list ap) override {
    if (level < GetInfoLogLevel()) return;
    char text[1024];
    std::vsnprintf(text, sizeof text, format, ap);
    if (level >= rocksdb::InfoLogLevel::ERROR_LEVEL) {
      LogError("rocksdb", text);
    } else {
      LogWarning("rocksdb", text);
    }
  }
};

constexpr char kNextJobSeq[] = "meta/next_job_seq";
constexpr char kNextBuildsetSeq[] = "meta/next_buildset_seq";
enum Family {
  kDefault = 0,
  kJobs = 1,
  kBlobs = 2,
  kBlobMeta = 3,
  kResults = 4,
  kFod = 5,
  kFodNames = 6,
  kTokens = 7,
  kLogs = 8,
  kNars = 9,
  kObjectNars = 10
};

}  // namespace

std::string RocksDbStateStore::JobKey(const std::string& job_id) {
  uint64_t n = 0;
  if (absl::SimpleAtoi(job_id, &n)) return absl::StrFormat("%020d", n);
  return job_id;  // Not numeric: sorts after every numeric id.
}

absl::StatusOr<std::unique_ptr<RocksDbStateStore>> RocksDbStateStore::Open(const std::string& dir, bool sync,
                                                                           uint64_t max_blob_bytes,
                                                                           const Clock* clock) {
  rocksdb::DBOptions db_options;
  db_options.create_if_missing = true;
  db_options.create_missing_column_families = true;
  db_options.max_background_jobs = 2;
  db_options.info_log = std::make_shared<RocksDbLogToKilnLog>();

  rocksdb::ColumnFamilyOptions jobs_options;
  jobs_options.OptimizeForPointLookup(64);
  // Small CAS blobs (larger ones are files, see CasStore). Source files
  // are often compressed already and the CPU is better spent elsewhere: no
  // compression. Table checksums use XXH3: Debian's RocksDB computes CRC32C
  // without the CPU's instruction, which cost a quarter of the coordinator's
  // CPU while it took a large tree.
  rocksdb::ColumnFamilyOptions blob_options;
  blob_options.compression = rocksdb::kNoCompression;
  rocksdb::BlockBasedTableOptions blob_table;
  blob_table.checksum = rocksdb::kXXH3;
  blob_options.table_factory.reset(rocksdb::NewBlockBasedTableFactory(blob_table));

  // Every submission looks its targets up, and most miss: bloom filters
  // (memtable and tables) answer a miss without a search.
  rocksdb::ColumnFamilyOptions results_options;
  results_options.OptimizeForPointLookup(16);
  std::vector<rocksdb::ColumnFamilyDescriptor> families = {
      {rocksdb::kDefaultColumnFamilyName, rocksdb::ColumnFamilyOptions()},
      {"jobs", jobs_options},
      {"blobs", blob_options},
      {"blob_meta", rocksdb::ColumnFamilyOptions()},
      {"results", results_options},
      {"fod", results_options},
      {"fod_names", results_options},
      {"tokens", rocksdb::ColumnFamilyOptions()},
      {"logs", blob_options},            // Compressed already (see job_log.h).
      {"nars", results_options},         // The farm store's narinfos, looked up one by one.
      {"object_nars", results_options},  // The same, of the object-storage farm store.
  };
  auto store = std::unique_ptr<RocksDbStateStore>(new RocksDbStateStore());
  store->sync_ = sync;
  rocksdb::DB* db = nullptr;
  rocksdb::Status s = rocksdb::DB::Open(db_options, dir, families, &store->handles_, &db);
  if (!s.ok()) return FromRocks(s, absl::StrCat("cannot open state in ", dir));
  store->db_.reset(db);
  store->cas_dir_ = (std::filesystem::path(dir) / "cas").string();
  store->cas_ = std::make_unique<CasStore>(db, store->handles_[kBlobs], store->handles_[kBlobMeta], store->cas_dir_,
                                           max_blob_bytes, sync);
  store->fod_cache_ = std::make_unique<FodCache>(db, store->handles_[kFod], store->handles_[kFodNames],
                                                 clock != nullptr ? clock : RealClock::Get(), sync);
  absl::StatusOr<std::unique_ptr<TokenStore>> tokens = TokenStore::Open(db, store->handles_[kTokens], sync);
  if (!tokens.ok()) return tokens.status();
  store->tokens_ = *std::move(tokens);
  store->nar_dir_ = (std::filesystem::path(dir) / "nar").string();
  absl::StatusOr<std::unique_ptr<LocalFarmStore>> farm_store =
      LocalFarmStore::Open(db, store->handles_[kNars], store->nar_dir_, sync);
  if (!farm_store.ok()) return farm_store.status();
  store->farm_store_ = *std::move(farm_store);
  return store;
}

absl::Status RocksDbStateStore::UseObjectStorage(std::unique_ptr<ObjectStore> objects, SigningKey key) {
  const std::string staging = (std::filesystem::path(nar_dir_).parent_path() / "nar-staging").string();
  absl::StatusOr<std::unique_ptr<ObjectFarmStore>> farm =
      ObjectFarmStore::Open(db_.get(), handles_[kObjectNars], std::move(objects), std::move(key), staging, sync_);
  if (!farm.ok()) return farm.status();
  farm_store_ = *std::move(farm);
  return absl::OkStatus();
}

absl::StatusOr<RocksDbStateStore::BackupStats> RocksDbStateStore::Backup(const std::string& destination) {
  namespace fs = std::filesystem;
  const fs::path dest(destination);
  std::error_code ec;
  if (!dest.is_absolute())
    return absl::InvalidArgumentError(absl::StrCat("backup: '", destination, "' is not absolute"));
  if (fs::exists(dest, ec)) {
    return absl::AlreadyExistsError(absl::StrCat("backup: ", destination, " exists already; name a new directory"));
  }
  fs::create_directories(dest, ec);
  if (ec) return absl::InternalError(absl::StrCat("backup: cannot create ", destination, ": ", ec.message()));
  fs::permissions(dest, fs::perms::owner_all, ec);  // Token hashes, sources: the coordinator's alone.
  BackupStats stats;
  // 1. The database, consistent at one instant: every column family.
  // 2. The CAS's files: every blob the checkpoint names is in place by then
  // (bytes are written before their meta); garbage collection waits from
  // before the checkpoint until they are copied.
  const fs::path checkpoint_dir = dest / "rocksdb";
  absl::StatusOr<CasStore::CopyStats> copied =
      cas_->CopyFilesTo((checkpoint_dir / fs::path(cas_dir_).filename()).string(),  // Where Open looks.
                        [&]() -> absl::Status {
                          rocksdb::Checkpoint* raw = nullptr;
                          rocksdb::Status s = rocksdb::Checkpoint::Create(db_.get(), &raw);
                          if (!s.ok()) return FromRocks(s, "backup: cannot start a checkpoint");
                          std::unique_ptr<rocksdb::Checkpoint> checkpoint(raw);
                          s = checkpoint->CreateCheckpoint(checkpoint_dir.string());
                          if (!s.ok()) return FromRocks(s, "backup: checkpoint failed");
                          return absl::OkStatus();
                        });
  if (!copied.ok()) return copied.status();
  // 3. The farm store's NARs: immutable files, each in place before any
  // record names it, so every one the checkpoint names is there now.
  const fs::path nar_copy = checkpoint_dir / fs::path(nar_dir_).filename();
  fs::create_directories(nar_copy, ec);
  for (const auto& entry : fs::directory_iterator(nar_dir_, ec)) {
    if (absl::StartsWith(entry.path().filename().string(), ".")) continue;  // Uploads under way.
    const fs::path to = nar_copy / entry.path().filename();
    std::error_code link_ec;
    fs::create_hard_link(entry.path(), to, link_ec);
    if (link_ec) fs::copy_file(entry.path(), to, link_ec);
    if (link_ec)
      return absl::InternalError(absl::StrCat("backup: cannot copy ", entry.path().string(), ": ", link_ec.message()));
    ++stats.nar_files;
  }
  // 4. The farm's signing key (STATE/cache-key.secret), so that clients
  // trusting it keep trusting a restored coordinator. Owner-only, as there.
  const fs::path key = fs::path(cas_dir_).parent_path().parent_path() / "cache-key.secret";
  if (fs::exists(key, ec)) {
    std::error_code copy_ec;
    fs::copy_file(key, dest / key.filename(), copy_ec);
    fs::permissions(dest / key.filename(), fs::perms::owner_read | fs::perms::owner_write, copy_ec);
    if (copy_ec) return absl::InternalError(absl::StrCat("backup: cannot copy the signing key: ", copy_ec.message()));
  }
  for (const auto& entry : fs::directory_iterator(checkpoint_dir, ec)) {
    if (entry.path().extension() == ".sst") stats.sst_bytes += entry.file_size(ec);
  }
  stats.cas_files = copied->files;
  stats.hard_linked = copied->hard_linked;
  return stats;
}

absl::Status RocksDbStateStore::Resume() { return FromRocks(db_->Resume(), "resuming state writes"); }

uint64_t RocksDbStateStore::FreeBytes() const {
  std::error_code ec;
  const std::filesystem::space_info space = std::filesystem::space(cas_dir_, ec);
  return ec ? UINT64_MAX : static_cast<uint64_t>(space.available);
}

bool RocksDbStateStore::WritesStopped() const {
  uint64_t value = 0;
  return db_->GetIntProperty(rocksdb::DB::Properties::kIsWriteStopped, &value) && value != 0;
}

RocksDbStateStore::Stats RocksDbStateStore::GetStats() const {
  Stats stats;
  auto sum = [&](rocksdb::ColumnFamilyHandle* cf, const rocksdb::Slice& property, uint64_t* into) {
    uint64_t value = 0;
    if (db_->GetIntProperty(cf, property, &value)) *into += value;
  };
  for (rocksdb::ColumnFamilyHandle* cf : handles_) {
    sum(cf, rocksdb::DB::Properties::kTotalSstFilesSize, &stats.sst_bytes);
    sum(cf, rocksdb::DB::Properties::kEstimateLiveDataSize, &stats.live_data_bytes);
    sum(cf, rocksdb::DB::Properties::kCurSizeAllMemTables, &stats.memtable_bytes);
    sum(cf, rocksdb::DB::Properties::kEstimatePendingCompactionBytes, &stats.pending_compaction_bytes);
    std::map<std::string, std::string> cfstats;
    if (db_->GetMapProperty(cf, rocksdb::DB::Properties::kCFStats, &cfstats)) {
      uint64_t n = 0;
      if (absl::SimpleAtoi(cfstats["io_stalls.total_stop"], &n)) stats.stops += n;
      if (absl::SimpleAtoi(cfstats["io_stalls.total_slowdown"], &n)) stats.slowdowns += n;
    }
  }
  // Database-wide properties.
  uint64_t value = 0;
  if (db_->GetIntProperty(rocksdb::DB::Properties::kNumRunningCompactions, &value)) stats.running_compactions = value;
  stats.writes_stopped = WritesStopped();
  if (db_->GetIntProperty(rocksdb::DB::Properties::kActualDelayedWriteRate, &value)) stats.delayed_write_rate = value;
  return stats;
}

RocksDbStateStore::~RocksDbStateStore() {
  cas_.reset();
  fod_cache_.reset();
  tokens_.reset();
  if (!db_) return;
  for (auto* h : handles_) db_->DestroyColumnFamilyHandle(h);
  db_->Close();
}

absl::Status RocksDbStateStore::Commit(const StateWrite& write) {
  rocksdb::WriteBatch batch;
  std::string value;
  for (const auto* job : write.jobs) {
    value.clear();
    if (!job->SerializeToString(&value)) return absl::InternalError("cannot serialise job record");
    batch.Put(handles_[kJobs], JobKey(job->job_id()), value);
  }
  for (const auto& [id, bytes] : write.packed_jobs) batch.Put(handles_[kJobs], JobKey(*id), *bytes);
  for (const auto& [key, entry] : write.cached_results) {
    batch.Put(handles_[kResults], key, entry->SerializeAsString());
  }
  for (const auto& [digest, bytes] : write.blobs) batch.Put(handles_[kBlobs], digest, bytes);
  for (const auto& [job_id, bytes] : write.logs) batch.Put(handles_[kLogs], JobKey(job_id), bytes);
  for (const std::string& job_id : write.deleted_logs) batch.Delete(handles_[kLogs], JobKey(job_id));
  if (write.next_job_seq != 0) {
    batch.Put(handles_[kDefault], kNextJobSeq, absl::StrCat(write.next_job_seq));
  }
  if (write.next_buildset_seq != 0) {
    batch.Put(handles_[kDefault], kNextBuildsetSeq, absl::StrCat(write.next_buildset_seq));
  }
  rocksdb::WriteOptions options;
  options.sync = sync_;
  return FromRocks(db_->Write(options, &batch), "state write");
}

absl::StatusOr<std::string> RocksDbStateStore::GetBlob(const std::string& sha256_hex) {
  std::string value;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), handles_[kBlobs], sha256_hex, &value);
  if (!s.ok()) return FromRocks(s, absl::StrCat("source blob ", sha256_hex));
  return value;
}

absl::StatusOr<std::string> RocksDbStateStore::GetLog(const std::string& job_id) {
  std::string value;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), handles_[kLogs], JobKey(job_id), &value);
  if (s.IsNotFound()) return absl::NotFoundError(absl::StrCat("no stored log for job ", job_id));
  if (!s.ok()) return FromRocks(s, "cannot read a job log");
  return value;
}

absl::Status RocksDbStateStore::ForEachPackedJob(absl::FunctionRef<absl::Status(absl::string_view)> fn) {
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), handles_[kJobs]));
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    if (absl::Status s = fn(absl::string_view(it->value().data(), it->value().size())); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat(s.message(), " under key ", it->key().ToString()));
    }
  }
  if (!it->status().ok()) return FromRocks(it->status(), "reading jobs");
  return absl::OkStatus();
}

absl::StatusOr<kiln::state::v1::CachedResult> RocksDbStateStore::GetCachedResult(const std::string& key) {
  std::string value;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), handles_[kResults], key, &value);
  if (!s.ok()) return FromRocks(s, "cached result");
  kiln::state::v1::CachedResult entry;
  if (!entry.ParseFromString(value)) return absl::DataLossError("unreadable cached result");
  return entry;
}

absl::StatusOr<StoredCounters> RocksDbStateStore::LoadCounters() {
  StoredCounters counters;
  for (auto [key, field] :
       {std::pair{kNextJobSeq, &counters.next_job_seq}, std::pair{kNextBuildsetSeq, &counters.next_buildset_seq}}) {
    std::string value;
    rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), handles_[kDefault], key, &value);
    if (s.IsNotFound()) continue;
    if (!s.ok()) return FromRocks(s, key);
    if (!absl::SimpleAtoi(value, field)) return absl::DataLossError(absl::StrCat("bad counter ", key));
  }
  return counters;
}

}  // namespace kiln
