#include "coordinator/farm_store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/digest.h"
#include "common/nix_hash.h"
#include "common/status_macros.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;

constexpr absl::string_view kNarSuffix = kCompressedNarSuffix;

absl::Status Errno(absl::string_view what, const std::string& path) {
  return absl::InternalError(absl::StrCat(what, " ", path, ": ", std::strerror(errno)));
}

std::string BaseName(absl::string_view store_path) {
  const size_t slash = store_path.rfind('/');
  return std::string(slash == absl::string_view::npos ? store_path : store_path.substr(slash + 1));
}

}  // namespace

absl::StatusOr<CompressedNar> CompressCheckedNar(const NarInfo& info, NarSource nar, const std::string& dir,
                                                 bool sync) {
  ASSIGN_OR_RETURN(std::unique_ptr<NarFileWriter> writer, NarFileWriter::Create(dir));
  absl::Status written = absl::OkStatus();
  // The reader pulls the NAR through here: what it reads is compressed as it
  // is checked.
  absl::StatusOr<NarSummary> summary = ReadNar([&](char* buf, size_t size) -> absl::StatusOr<size_t> {
    ASSIGN_OR_RETURN(size_t n, nar(buf, size));
    written = writer->Write(absl::string_view(buf, n));
    if (!written.ok()) return written;
    return n;
  });
  RETURN_IF_ERROR(written);
  if (!summary.ok()) return WithContext(summary.status(), absl::StrCat("NAR of ", info.store_path));
  absl::StatusOr<NixHash> claimed = ParseNixHash(info.nar_hash);
  if (summary->nar_bytes != info.nar_size || !claimed.ok() || claimed->bytes != summary->sha256) {
    NixHash got;
    got.algo = HashAlgo::kSha256;
    got.bytes = summary->sha256;
    return absl::DataLossError(absl::StrCat("NAR of ", info.store_path, " is ", summary->nar_bytes,
                                            " bytes with hash sha256:", got.Base32(), ", not the ", info.nar_size,
                                            " bytes and hash ", info.nar_hash, " announced"));
  }
  return writer->Finish(sync);
}

absl::StatusOr<NarInfo> NormalizeAnnounced(const NarInfo& announced) {
  RETURN_IF_ERROR(StorePathHashPart(announced.store_path).status());
  if (!absl::StartsWith(announced.store_path, "/nix/store/")) {
    return absl::InvalidArgumentError(absl::StrCat("not in /nix/store: ", announced.store_path));
  }
  NarInfo stored;
  stored.store_path = announced.store_path;
  stored.nar_hash = announced.nar_hash;
  stored.nar_size = announced.nar_size;
  // Narinfos name references by base name; a full path is taken too.
  for (const std::string& ref : announced.references) {
    RETURN_IF_ERROR(StorePathHashPart(ref).status());
    stored.references.push_back(BaseName(ref));
  }
  std::sort(stored.references.begin(), stored.references.end());
  stored.deriver = announced.deriver.empty() ? "" : BaseName(announced.deriver);
  stored.ca = announced.ca;
  return stored;
}

absl::StatusOr<std::string> FarmStore::DirectUploadUrl(const NarInfo&) {
  return absl::UnimplementedError("this farm store takes uploads through the coordinator");
}

absl::Status FarmStore::CommitDirectUpload(const NarInfo&) {
  return absl::UnimplementedError("this farm store takes uploads through the coordinator");
}

// ---- IndexedFarmStore ----

absl::StatusOr<absl::flat_hash_set<std::string>> IndexedFarmStore::LoadRecords() {
  FarmStoreStats stats;
  absl::flat_hash_set<std::string> named;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), family_));
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    absl::StatusOr<NarInfo> info = ParseNarInfo(absl::string_view(it->value().data(), it->value().size()));
    if (!info.ok()) return WithContext(info.status(), "farm store record ", it->key().ToString());
    ++stats.paths;
    if (named.insert(BaseName(info->url)).second) stats.file_bytes += info->file_size;
  }
  if (!it->status().ok()) return absl::InternalError(absl::StrCat("farm store read: ", it->status().ToString()));
  absl::MutexLock lock(&mu_);
  stats_ = stats;
  return named;
}

FarmStoreStats IndexedFarmStore::Stats() const {
  absl::MutexLock lock(&mu_);
  return stats_;
}

absl::StatusOr<bool> IndexedFarmStore::Holds(const std::string& hash_part) {
  std::string value;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), family_, hash_part, &value);
  if (s.IsNotFound()) return false;
  if (!s.ok()) return absl::InternalError(absl::StrCat("farm store read: ", s.ToString()));
  return true;
}

absl::StatusOr<std::vector<std::string>> IndexedFarmStore::Missing(const std::vector<std::string>& store_paths) {
  std::vector<std::string> missing;
  for (const std::string& path : store_paths) {
    ASSIGN_OR_RETURN(std::string hash_part, StorePathHashPart(path));
    ASSIGN_OR_RETURN(bool held, Holds(hash_part));
    if (!held) missing.push_back(path);
  }
  return missing;
}

absl::StatusOr<NarInfo> IndexedFarmStore::Get(const std::string& hash_part) {
  if (hash_part.size() != 32 || !StorePathHashPart(absl::StrCat(hash_part, "-x")).ok()) {
    return absl::NotFoundError("not a store path hash");
  }
  std::string value;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), family_, hash_part, &value);
  if (s.IsNotFound()) return absl::NotFoundError(absl::StrCat(hash_part, " is not in the farm store"));
  if (!s.ok()) return absl::InternalError(absl::StrCat("farm store read: ", s.ToString()));
  ASSIGN_OR_RETURN(NarInfo info, ParseNarInfo(value));
  Touch(hash_part, info);
  return info;
}

absl::Status IndexedFarmStore::CheckReferences(const NarInfo& info) {
  const std::string self = BaseName(info.store_path);
  for (const std::string& ref : info.references) {
    if (ref == self) continue;
    ASSIGN_OR_RETURN(std::string ref_hash, StorePathHashPart(ref));
    ASSIGN_OR_RETURN(bool held, Holds(ref_hash));
    if (!held) {
      return absl::FailedPreconditionError(
          absl::StrCat(info.store_path, " references ", ref, ", which the farm store lacks: add it first"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<bool> IndexedFarmStore::BeginAdd(const std::string& hash_part) {
  absl::MutexLock lock(&mu_);
  // Another upload of this path: wait for it, then it is held (or failed).
  const auto free = [this, &hash_part]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !adding_.contains(hash_part); };
  mu_.Await(absl::Condition(&free));
  ASSIGN_OR_RETURN(bool held, Holds(hash_part));
  if (held) return false;
  adding_.insert(hash_part);
  return true;
}

absl::Status IndexedFarmStore::FinishAdd(const std::string& hash_part, const NarInfo& stored, absl::Status status) {
  if (status.ok()) status = Publish(stored);
  const bool published = status.ok();
  absl::MutexLock lock(&mu_);
  if (status.ok()) {
    // Checked again with collections kept out: a reference collected since
    // the first check, or the body (another path's too) collected since it
    // was stored, and this record would break the store.
    const std::string self = BaseName(stored.store_path);
    for (const std::string& ref : stored.references) {
      if (ref == self || !status.ok()) continue;
      absl::StatusOr<std::string> ref_hash = StorePathHashPart(ref);
      absl::StatusOr<bool> held = ref_hash.ok() ? Holds(*ref_hash) : ref_hash.status();
      if (!held.ok())
        status = held.status();
      else if (!*held)
        status = absl::FailedPreconditionError(absl::StrCat(ref, " was collected meanwhile: add it again"));
    }
    if (status.ok()) status = CheckBodyKept(stored);
  }
  if (status.ok()) {
    rocksdb::WriteOptions options;
    options.sync = sync_;
    rocksdb::Status s = db_->Put(options, family_, hash_part, stored.Render());
    if (!s.ok()) status = absl::InternalError(absl::StrCat("farm store write: ", s.ToString()));
  }
  if (status.ok()) {
    ++stats_.paths;
    stats_.file_bytes += stored.file_size;
  } else if (published) {
    Unpublish(stored);
  }
  adding_.erase(hash_part);
  return status;
}

absl::Status IndexedFarmStore::Add(const NarInfo& announced, NarSource nar) {
  ASSIGN_OR_RETURN(NarInfo stored, NormalizeAnnounced(announced));
  ASSIGN_OR_RETURN(const std::string hash_part, StorePathHashPart(stored.store_path));
  RETURN_IF_ERROR(CheckReferences(stored));
  ASSIGN_OR_RETURN(bool begun, BeginAdd(hash_part));
  if (!begun) return absl::OkStatus();
  absl::Status status = StoreBody(stored, nar);
  status = FinishAdd(hash_part, stored, status);
  if (status.ok()) Touch(hash_part, stored);
  return status;
}

// ---- LocalFarmStore ----

absl::StatusOr<std::unique_ptr<LocalFarmStore>> LocalFarmStore::Open(rocksdb::DB* db,
                                                                     rocksdb::ColumnFamilyHandle* family,
                                                                     std::string nar_dir, bool sync,
                                                                     const Clock* clock) {
  std::error_code ec;
  fs::create_directories(nar_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", nar_dir, ": ", ec.message()));
  auto store = std::unique_ptr<LocalFarmStore>(new LocalFarmStore(db, family, std::move(nar_dir), sync, clock));
  ASSIGN_OR_RETURN(absl::flat_hash_set<std::string> named, store->LoadRecords());
  // Uploads a crash interrupted (never visible, never finished), and files
  // whose record a crash kept from being written or a collection removed.
  for (const auto& entry : fs::directory_iterator(store->nar_dir_, ec)) {
    const std::string name = entry.path().filename().string();
    if (absl::StartsWith(name, ".upload-") || (absl::EndsWith(name, kNarSuffix) && !named.contains(name))) {
      fs::remove(entry.path(), ec);
    }
  }
  return store;
}

void LocalFarmStore::Touch(const std::string& hash_part, const NarInfo& info) {
  const absl::Time now = clock_->Now();
  {
    absl::MutexLock lock(&mu_);
    auto [it, inserted] = touched_.try_emplace(hash_part, absl::InfinitePast());
    if (now - it->second < absl::Hours(1)) return;
    it->second = now;
  }
  const std::string file = absl::StrCat(nar_dir_, "/", BaseName(info.url));
  const timespec ts = absl::ToTimespec(now);
  const timespec times[2] = {ts, ts};
  ::utimensat(AT_FDCWD, file.c_str(), times, 0);  // Best effort: a missed bump only ages the path.
}

absl::Time LocalFarmStore::LastUsed(const std::string& hash_part, const NarInfo& info) {
  struct stat st;
  absl::Time t = ::stat(absl::StrCat(nar_dir_, "/", BaseName(info.url)).c_str(), &st) == 0
                     ? absl::TimeFromTimespec(st.st_mtim)
                     : absl::InfinitePast();
  if (auto it = touched_.find(hash_part); it != touched_.end()) t = std::max(t, it->second);
  return t;
}

void LocalFarmStore::RemoveBodies(const std::vector<std::string>& files, const std::vector<NarInfo>& collected) {
  for (const std::string& f : files) ::unlink(absl::StrCat(nar_dir_, "/", f).c_str());
  for (const NarInfo& info : collected) {
    if (absl::StatusOr<std::string> h = StorePathHashPart(info.store_path); h.ok()) touched_.erase(*h);
  }
}

absl::StatusOr<NarLocation> LocalFarmStore::LocateNar(absl::string_view name) {
  const absl::string_view digits = absl::StripSuffix(name, kNarSuffix);
  if (digits.size() != 52 || digits.size() == name.size() || !DecodeNixBase32(digits, 32).ok()) {
    return absl::NotFoundError("no such NAR");
  }
  const std::string path = absl::StrCat(nar_dir_, "/", name);
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) return absl::NotFoundError("no such NAR");
  return NarLocation{.file = path, .url = ""};
}

absl::Status LocalFarmStore::ReadNar(absl::string_view name, absl::FunctionRef<absl::Status(absl::string_view)> sink) {
  ASSIGN_OR_RETURN(NarLocation location, LocateNar(name));
  const int fd = ::open(location.file.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat("no NAR ", name));
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  std::string buf(size_t{1} << 20, '\0');
  for (;;) {
    const ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Errno("cannot read", location.file);
    if (n == 0) return absl::OkStatus();
    RETURN_IF_ERROR(sink(absl::string_view(buf.data(), static_cast<size_t>(n))));
  }
}

absl::Status LocalFarmStore::StoreBody(NarInfo& info, NarSource nar) {
  ASSIGN_OR_RETURN(CompressedNar compressed, CompressCheckedNar(info, nar, nar_dir_, sync_));
  const std::string final_path = absl::StrCat(nar_dir_, "/", compressed.name);
  if (::rename(compressed.file.c_str(), final_path.c_str()) != 0) {
    const absl::Status s = Errno("cannot rename to", final_path);
    ::unlink(compressed.file.c_str());
    return s;
  }
  // The rename itself, before any record names the file.
  if (const int dir = ::open(nar_dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); dir >= 0) {
    ::fsync(dir);
    ::close(dir);
  }
  info.url = absl::StrCat("nar/", compressed.name);
  info.compression = "zstd";
  info.file_hash = compressed.file_hash;
  info.file_size = compressed.file_size;
  info.nar_hash = compressed.nar_hash;
  return absl::OkStatus();
}

absl::Status LocalFarmStore::CheckBodyKept(const NarInfo& info) {
  std::error_code ec;
  if (!fs::exists(absl::StrCat(nar_dir_, "/", BaseName(info.url)), ec)) {
    return absl::AbortedError(absl::StrCat("the NAR of ", info.store_path, " was collected meanwhile: send it again"));
  }
  return absl::OkStatus();
}

absl::StatusOr<NarInfo> SignNarInfo(NarInfo info, const SigningKey& key) {
  const std::string prefix = absl::StrCat(key.name(), ":");
  std::erase_if(info.sigs, [&](const std::string& s) { return absl::StartsWith(s, prefix); });
  ASSIGN_OR_RETURN(std::string sig, key.Sign(info.Fingerprint()));
  info.sigs.push_back(std::move(sig));
  return info;
}

}  // namespace kiln
