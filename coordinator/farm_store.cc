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

// Fast enough to keep up with a network upload on one core, and most of
// zstd's ratio on text.
constexpr int kZstdLevel = 3;
constexpr char kNarSuffix[] = ".nar.zst";

absl::Status Errno(absl::string_view what, const std::string& path) {
  return absl::InternalError(absl::StrCat(what, " ", path, ": ", std::strerror(errno)));
}

absl::Status WriteAll(int fd, const char* data, size_t size, const std::string& path) {
  while (size > 0) {
    const ssize_t n = ::write(fd, data, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return Errno("cannot write", path);
    data += n;
    size -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

std::string Sha256Base32(const std::string& raw) {
  NixHash h;
  h.algo = HashAlgo::kSha256;
  h.bytes = raw;
  return absl::StrCat("sha256:", h.Base32());
}

std::string BaseName(absl::string_view store_path) {
  const size_t slash = store_path.rfind('/');
  return std::string(slash == absl::string_view::npos ? store_path : store_path.substr(slash + 1));
}

struct ZstdFree {
  void operator()(ZSTD_CCtx* c) const { ZSTD_freeCCtx(c); }
};

}  // namespace

absl::StatusOr<std::unique_ptr<LocalFarmStore>> LocalFarmStore::Open(rocksdb::DB* db,
                                                                     rocksdb::ColumnFamilyHandle* family,
                                                                     std::string nar_dir, bool sync,
                                                                     const Clock* clock) {
  std::error_code ec;
  fs::create_directories(nar_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", nar_dir, ": ", ec.message()));
  auto store = std::unique_ptr<LocalFarmStore>(new LocalFarmStore(db, family, std::move(nar_dir), sync, clock));
  RETURN_IF_ERROR(store->Load());
  return store;
}

absl::Status LocalFarmStore::Load() {
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
  // Uploads a crash interrupted (never visible, never finished), and files
  // whose record a crash kept from being written or a collection removed.
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(nar_dir_, ec)) {
    const std::string name = entry.path().filename().string();
    if (absl::StartsWith(name, ".upload-") || (absl::EndsWith(name, kNarSuffix) && !named.contains(name))) {
      fs::remove(entry.path(), ec);
    }
  }
  absl::MutexLock lock(&mu_);
  stats_ = stats;
  return absl::OkStatus();
}

FarmStoreStats LocalFarmStore::Stats() const {
  absl::MutexLock lock(&mu_);
  return stats_;
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

absl::StatusOr<bool> LocalFarmStore::Holds(const std::string& hash_part) {
  std::string value;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), family_, hash_part, &value);
  if (s.IsNotFound()) return false;
  if (!s.ok()) return absl::InternalError(absl::StrCat("farm store read: ", s.ToString()));
  return true;
}

absl::StatusOr<std::vector<std::string>> LocalFarmStore::Missing(const std::vector<std::string>& store_paths) {
  std::vector<std::string> missing;
  for (const std::string& path : store_paths) {
    ASSIGN_OR_RETURN(std::string hash_part, StorePathHashPart(path));
    ASSIGN_OR_RETURN(bool held, Holds(hash_part));
    if (!held) missing.push_back(path);
  }
  return missing;
}

absl::StatusOr<NarInfo> LocalFarmStore::Get(const std::string& hash_part) {
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

absl::StatusOr<std::string> LocalFarmStore::NarFile(absl::string_view name) {
  const absl::string_view digits = absl::StripSuffix(name, kNarSuffix);
  if (digits.size() != 52 || digits.size() == name.size() || !DecodeNixBase32(digits, 32).ok()) {
    return absl::NotFoundError("no such NAR");
  }
  const std::string path = absl::StrCat(nar_dir_, "/", name);
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) return absl::NotFoundError("no such NAR");
  return path;
}

absl::Status LocalFarmStore::WriteBody(NarInfo& info, NarSource nar) {
  std::string temp = absl::StrCat(nar_dir_, "/.upload-XXXXXX");
  const int fd = ::mkstemp(temp.data());
  if (fd < 0) return Errno("cannot create a file in", nar_dir_);
  bool kept = false;
  auto cleanup = [&] {
    ::close(fd);
    if (!kept) ::unlink(temp.c_str());
  };
  std::unique_ptr<ZSTD_CCtx, ZstdFree> zstd(ZSTD_createCCtx());
  ZSTD_CCtx_setParameter(zstd.get(), ZSTD_c_compressionLevel, kZstdLevel);
  std::vector<char> out(ZSTD_CStreamOutSize());
  Sha256 file_hash;
  uint64_t file_size = 0;
  // Compresses `in` (all of it; with `end`, the frame's end too) to the file.
  auto compress = [&](absl::string_view in, ZSTD_EndDirective mode) -> absl::Status {
    ZSTD_inBuffer input{in.data(), in.size(), 0};
    for (;;) {
      ZSTD_outBuffer output{out.data(), out.size(), 0};
      const size_t left = ZSTD_compressStream2(zstd.get(), &output, &input, mode);
      if (ZSTD_isError(left)) return absl::InternalError(absl::StrCat("zstd: ", ZSTD_getErrorName(left)));
      const absl::string_view piece(out.data(), output.pos);
      file_hash.Update(piece);
      file_size += piece.size();
      RETURN_IF_ERROR(WriteAll(fd, piece.data(), piece.size(), temp));
      if (mode == ZSTD_e_end ? left == 0 : input.pos == input.size) return absl::OkStatus();
    }
  };
  absl::Status written = absl::OkStatus();
  // The reader pulls the NAR through here: what it reads is compressed as it
  // is checked.
  absl::StatusOr<NarSummary> summary = ReadNar([&](char* buf, size_t size) -> absl::StatusOr<size_t> {
    ASSIGN_OR_RETURN(size_t n, nar(buf, size));
    if (absl::Status s = compress(absl::string_view(buf, n), ZSTD_e_continue); !s.ok()) {
      written = s;
      return s;
    }
    return n;
  });
  if (!written.ok()) {
    cleanup();
    return written;
  }
  if (!summary.ok()) {
    cleanup();
    return WithContext(summary.status(), absl::StrCat("NAR of ", info.store_path));
  }
  absl::StatusOr<NixHash> claimed = ParseNixHash(info.nar_hash);
  if (summary->nar_bytes != info.nar_size || !claimed.ok() || claimed->bytes != summary->sha256) {
    cleanup();
    return absl::DataLossError(absl::StrCat("NAR of ", info.store_path, " is ", summary->nar_bytes, " bytes with hash ",
                                            Sha256Base32(summary->sha256), ", not the ", info.nar_size,
                                            " bytes and hash ", info.nar_hash, " announced"));
  }
  if (absl::Status s = compress("", ZSTD_e_end); !s.ok()) {
    cleanup();
    return s;
  }
  if (::fsync(fd) != 0) {
    const absl::Status s = Errno("cannot sync", temp);
    cleanup();
    return s;
  }
  const std::string file_sha = absl::HexStringToBytes(file_hash.FinishHex());
  NixHash fh;
  fh.algo = HashAlgo::kSha256;
  fh.bytes = file_sha;
  const std::string name = absl::StrCat(fh.Base32(), kNarSuffix);
  const std::string final_path = absl::StrCat(nar_dir_, "/", name);
  if (::rename(temp.c_str(), final_path.c_str()) != 0) {
    const absl::Status s = Errno("cannot rename to", final_path);
    cleanup();
    return s;
  }
  kept = true;
  cleanup();
  // The rename itself, before any record names the file.
  if (const int dir = ::open(nar_dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); dir >= 0) {
    ::fsync(dir);
    ::close(dir);
  }
  info.url = absl::StrCat("nar/", name);
  info.compression = "zstd";
  info.file_hash = absl::StrCat("sha256:", fh.Base32());
  info.file_size = file_size;
  info.nar_hash = Sha256Base32(summary->sha256);
  return absl::OkStatus();
}

absl::Status LocalFarmStore::Add(const NarInfo& announced, NarSource nar) {
  ASSIGN_OR_RETURN(const std::string hash_part, StorePathHashPart(announced.store_path));
  if (!absl::StartsWith(announced.store_path, "/nix/store/")) {
    return absl::InvalidArgumentError(absl::StrCat("not in /nix/store: ", announced.store_path));
  }
  const std::string self = BaseName(announced.store_path);
  for (const std::string& ref : announced.references) {
    if (ref == self) continue;
    ASSIGN_OR_RETURN(std::string ref_hash, StorePathHashPart(ref));
    ASSIGN_OR_RETURN(bool held, Holds(ref_hash));
    if (!held) {
      return absl::FailedPreconditionError(
          absl::StrCat(announced.store_path, " references ", ref, ", which the farm store lacks: add it first"));
    }
  }
  {
    absl::MutexLock lock(&mu_);
    // Another upload of this path: wait for it, then it is held (or failed).
    const auto free = [this, &hash_part]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !adding_.contains(hash_part); };
    mu_.Await(absl::Condition(&free));
    ASSIGN_OR_RETURN(bool held, Holds(hash_part));
    if (held) return absl::OkStatus();
    adding_.insert(hash_part);
  }
  NarInfo stored;
  stored.store_path = announced.store_path;
  stored.nar_hash = announced.nar_hash;
  stored.nar_size = announced.nar_size;
  // Narinfos name references by base name; a full path is taken too.
  for (const std::string& ref : announced.references) stored.references.push_back(BaseName(ref));
  std::sort(stored.references.begin(), stored.references.end());
  stored.deriver = announced.deriver;
  stored.ca = announced.ca;
  absl::Status status = WriteBody(stored, nar);
  absl::MutexLock lock(&mu_);
  if (status.ok()) {
    // Checked again with collections kept out: a reference collected since
    // the first check, or the body's file (another path's too) collected
    // since it was renamed into place, and this record would break the store.
    for (const std::string& ref : stored.references) {
      if (ref == self || !status.ok()) continue;
      absl::StatusOr<std::string> ref_hash = StorePathHashPart(ref);
      absl::StatusOr<bool> held = ref_hash.ok() ? Holds(*ref_hash) : ref_hash.status();
      if (!held.ok())
        status = held.status();
      else if (!*held)
        status = absl::FailedPreconditionError(absl::StrCat(ref, " was collected meanwhile: add it again"));
    }
    std::error_code ec;
    if (status.ok() && !fs::exists(absl::StrCat(nar_dir_, "/", BaseName(stored.url)), ec)) {
      status =
          absl::AbortedError(absl::StrCat("the NAR of ", stored.store_path, " was collected meanwhile: send it again"));
    }
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
    touched_[hash_part] = clock_->Now();
  }
  adding_.erase(hash_part);
  return status;
}

absl::StatusOr<NarInfo> SignNarInfo(NarInfo info, const SigningKey& key) {
  const std::string prefix = absl::StrCat(key.name(), ":");
  std::erase_if(info.sigs, [&](const std::string& s) { return absl::StartsWith(s, prefix); });
  ASSIGN_OR_RETURN(std::string sig, key.Sign(info.Fingerprint()));
  info.sigs.push_back(std::move(sig));
  return info;
}

}  // namespace kiln
