#include "coordinator/cas_store.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <memory>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <utility>

#include <rocksdb/write_batch.h>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "coordinator/rocks_status.h"
#include "common/status_macros.h"

namespace kiln {
namespace {

using kiln::state::v1::BlobMeta;
using kiln::v1::Digest;

std::string Short(const std::string& hash) { return hash.substr(0, 12); }

}  // namespace

CasStore::CasStore(rocksdb::DB* db, rocksdb::ColumnFamilyHandle* blobs, rocksdb::ColumnFamilyHandle* meta,
                   std::string files_dir, uint64_t max_blob_bytes, bool sync)
    : db_(db),
      blobs_(blobs),
      meta_(meta),
      files_dir_(std::move(files_dir)),
      max_blob_bytes_(max_blob_bytes),
      sync_(sync) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(fs::path(files_dir_) / "tmp", ec);
  // Uploads cut short by a crash leave temporary files; none is in use now.
  fs::remove_all(fs::path(files_dir_) / "tmp", ec);
  fs::create_directories(fs::path(files_dir_) / "tmp", ec);
  fs::create_directories(fs::path(files_dir_) / "packs", ec);
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), meta_));
  uint64_t total = 0;
  BlobMeta stored;
  absl::MutexLock lock(&pack_mu_);
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    if (stored.ParseFromArray(it->value().data(), static_cast<int>(it->value().size()))) {
      total += static_cast<uint64_t>(stored.size_bytes());
      if (stored.pack() != 0) ++pack_live_[stored.pack()];
    }
  }
  total_bytes_ = total;
  // New blobs go to a new pack (the last one's tail may be torn), and a
  // pack no meta names holds only blobs that never became visible.
  for (const auto& entry : fs::directory_iterator(fs::path(files_dir_) / "packs", ec)) {
    uint64_t id = 0;
    const std::string name = entry.path().filename().string();
    if (!absl::EndsWith(name, ".pack") || !absl::SimpleAtoi(absl::StripSuffix(name, ".pack"), &id)) continue;
    next_pack_id_ = std::max(next_pack_id_, id + 1);
    if (!pack_live_.contains(id)) ::unlink(entry.path().c_str());
  }
  for (const auto& [id, live] : pack_live_) next_pack_id_ = std::max(next_pack_id_, id + 1);
}

CasStore::PackFile::~PackFile() {
  if (fd >= 0) ::close(fd);
}

std::string CasStore::PackPath(uint64_t pack) const {
  return (std::filesystem::path(files_dir_) / "packs" / absl::StrCat(pack, ".pack")).string();
}

absl::Status CasStore::AppendToPack(absl::string_view data, BlobMeta& meta) {
  std::shared_ptr<PackFile> pack;
  uint64_t offset = 0;
  {
    absl::MutexLock lock(&pack_mu_);
    if (current_pack_ == nullptr || current_pack_size_ >= kPackBytes) {
      auto next = std::make_shared<PackFile>();
      next->id = next_pack_id_++;
      const std::string path = PackPath(next->id);
      next->fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0444);
      if (next->fd < 0) return absl::InternalError(absl::StrCat("cannot create ", path, ": ", std::strerror(errno)));
      if (current_pack_ != nullptr) {
        // The pack being closed may be empty already (all collected).
        if (auto old = pack_live_.find(current_pack_->id); old == pack_live_.end() || old->second == 0) {
          if (old != pack_live_.end()) pack_live_.erase(old);
          ::unlink(PackPath(current_pack_->id).c_str());
        }
      }
      current_pack_ = std::move(next);
      current_pack_size_ = 0;
    }
    pack = current_pack_;
    offset = current_pack_size_;
    current_pack_size_ += data.size();
    ++pack_live_[pack->id];
  }
  for (size_t at = 0; at < data.size();) {
    const ssize_t n = ::pwrite(pack->fd, data.data() + at, data.size() - at, static_cast<off_t>(offset + at));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const std::string why = std::strerror(errno);
      ReleasePackRange(pack->id, offset, data.size());
      return absl::InternalError(absl::StrCat("cannot write pack ", pack->id, ": ", why));
    }
    at += static_cast<size_t>(n);
  }
  if (sync_ && ::fdatasync(pack->fd) != 0) {
    const std::string why = std::strerror(errno);
    ReleasePackRange(pack->id, offset, data.size());
    return absl::InternalError(absl::StrCat("cannot sync pack ", pack->id, ": ", why));
  }
  meta.set_pack(pack->id);
  meta.set_pack_offset(offset);
  return absl::OkStatus();
}

void CasStore::ReleasePackRange(uint64_t pack, uint64_t offset, uint64_t size) {
  const std::string path = PackPath(pack);
  if (size > 0) {
    // Gives the space back now; a file system without hole punching gets
    // it back when the whole pack goes.
    if (const int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC); fd >= 0) {
      ::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset), static_cast<off_t>(size));
      ::close(fd);
    }
  }
  absl::MutexLock lock(&pack_mu_);
  auto it = pack_live_.find(pack);
  if (it == pack_live_.end() || --it->second > 0) return;
  if (current_pack_ != nullptr && current_pack_->id == pack) return;  // Still being filled.
  pack_live_.erase(it);
  ::unlink(path.c_str());
}

absl::Status CasStore::ReadFromPack(const std::string& hash, const BlobMeta& meta,
                                    absl::FunctionRef<absl::Status(absl::string_view)> fn) const {
  const int fd = ::open(PackPath(meta.pack()).c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::DataLossError(
        absl::StrCat("blob ", hash, " is missing its pack ", meta.pack(), ": ", std::strerror(errno)));
  }
  std::string buffer(static_cast<size_t>(meta.size_bytes()), '\0');
  size_t done = 0;
  while (done < buffer.size()) {
    const ssize_t n =
        ::pread(fd, buffer.data() + done, buffer.size() - done, static_cast<off_t>(meta.pack_offset() + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  if (done < buffer.size()) return absl::DataLossError(absl::StrCat("blob ", hash, " is cut short in its pack"));
  return fn(buffer);
}

absl::StatusOr<CasStore::CopyStats> CasStore::CopyFilesTo(const std::string& dest,
                                                          absl::FunctionRef<absl::Status()> checkpoint) {
  namespace fs = std::filesystem;
  absl::ReaderMutexLock gc_lock(&gc_mu_);
  RETURN_IF_ERROR(checkpoint());
  CopyStats stats;
  const fs::path from(files_dir_);
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(from, ec); !ec && it != fs::recursive_directory_iterator();
       it.increment(ec)) {
    const fs::path rel = it->path().lexically_relative(from);
    const bool in_packs = rel.begin() != rel.end() && *rel.begin() == "packs";
    if (rel.begin() != rel.end() && *rel.begin() == "tmp") {
      it.disable_recursion_pending();  // Uploads in progress.
      continue;
    }
    std::error_code file_ec;
    if (it->is_directory(file_ec)) {
      fs::create_directories(fs::path(dest) / rel, file_ec);
      continue;
    }
    if (!it->is_regular_file(file_ec)) continue;
    const fs::path to = fs::path(dest) / rel;
    fs::create_directories(to.parent_path(), file_ec);
    if (!in_packs) fs::create_hard_link(it->path(), to, file_ec);
    if (in_packs || file_ec) {
      if (!in_packs) stats.hard_linked = false;
      file_ec.clear();
      fs::copy_file(it->path(), to, file_ec);
      if (file_ec) {
        if (!fs::exists(it->path())) continue;  // An emptied pack, deleted meanwhile.
        return absl::InternalError(absl::StrCat("backup: cannot copy ", it->path().string(), ": ", file_ec.message()));
      }
    }
    ++stats.files;
  }
  if (ec) return absl::InternalError(absl::StrCat("backup: cannot read ", files_dir_, ": ", ec.message()));
  return stats;
}

absl::StatusOr<uint64_t> CasStore::CollectGarbage(const absl::flat_hash_set<std::string>& keep, int64_t older_than_unix,
                                                  uint64_t target_bytes) {
  absl::MutexLock lock(&gc_mu_);
  struct Candidate {
    int64_t stored;
    std::string hash;
    BlobMeta meta;
  };
  std::vector<Candidate> old_blobs, directories;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), meta_));
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    std::string hash = it->key().ToString();
    if (keep.contains(hash)) continue;
    Candidate c{.stored = 0, .hash = std::move(hash), .meta = {}};
    if (!c.meta.ParseFromArray(it->value().data(), static_cast<int>(it->value().size()))) continue;
    c.stored = c.meta.stored_unix();
    if (c.meta.is_directory()) directories.push_back(c);
    if (c.stored < older_than_unix) old_blobs.push_back(std::move(c));
  }
  if (!it->status().ok()) return FromRocks(it->status(), "reading blob metas");
  std::sort(old_blobs.begin(), old_blobs.end(),
            [](const Candidate& a, const Candidate& b) { return a.stored < b.stored; });
  uint64_t freed = 0;
  absl::flat_hash_set<std::string> deleted;
  const auto remove = [&](const Candidate& c) -> absl::Status {
    if (!deleted.insert(c.hash).second) return absl::OkStatus();
    // The meta first: from then on the blob is absent, whatever remains.
    rocksdb::WriteBatch batch;
    batch.Delete(meta_, c.hash);
    if (!c.meta.in_file() && c.meta.pack() == 0) batch.Delete(blobs_, c.hash);
    if (rocksdb::Status s = db_->Write(rocksdb::WriteOptions(), &batch); !s.ok()) return FromRocks(s, "blob delete");
    if (c.meta.in_file()) ::unlink(FilePath(c.hash).c_str());
    if (c.meta.pack() != 0) {
      ReleasePackRange(c.meta.pack(), c.meta.pack_offset(), static_cast<uint64_t>(c.meta.size_bytes()));
    }
    total_bytes_ -= std::min<uint64_t>(total_bytes_.load(), static_cast<uint64_t>(c.meta.size_bytes()));
    freed += static_cast<uint64_t>(c.meta.size_bytes());
    return absl::OkStatus();
  };
  for (const Candidate& c : old_blobs) {
    if (total_bytes_.load() <= target_bytes) break;
    RETURN_IF_ERROR(remove(c));
  }
  if (!deleted.empty()) {
    for (const Candidate& c : directories) {
      RETURN_IF_ERROR(remove(c));
    }
  }
  return freed;
}

std::string CasStore::FilePath(const std::string& hash) const {
  return (std::filesystem::path(files_dir_) / hash.substr(0, 2) / hash).string();
}

absl::StatusOr<BlobMeta> CasStore::Meta(const std::string& hash) const {
  std::string value;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), meta_, hash, &value);
  if (s.ok()) {
    BlobMeta meta;
    if (!meta.ParseFromString(value)) return absl::DataLossError(absl::StrCat("unreadable meta of blob ", hash));
    return meta;
  }
  if (!s.IsNotFound()) return FromRocks(s, "blob meta");
  // A blob stored by an inline submission, before blobs had meta.
  std::string bytes;
  s = db_->Get(rocksdb::ReadOptions(), blobs_, hash, &bytes);
  if (!s.ok()) return FromRocks(s, absl::StrCat("blob ", hash));
  BlobMeta meta;
  meta.set_size_bytes(static_cast<int64_t>(bytes.size()));
  return meta;
}

bool CasStore::HasFile(const Digest& digest) const {
  absl::StatusOr<BlobMeta> meta = Meta(digest.hash());
  return meta.ok() && meta->size_bytes() == digest.size_bytes();
}

bool CasStore::HasDirectory(const Digest& digest) const {
  absl::StatusOr<BlobMeta> meta = Meta(digest.hash());
  return meta.ok() && meta->is_directory() && meta->size_bytes() == digest.size_bytes();
}

absl::Status CasStore::Read(const std::string& hash, absl::FunctionRef<absl::Status(absl::string_view)> fn) const {
  absl::StatusOr<BlobMeta> meta = Meta(hash);
  if (!meta.ok()) return meta.status();
  if (meta->pack() != 0) return ReadFromPack(hash, *meta, fn);
  if (!meta->in_file()) {
    std::string value;
    rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), blobs_, hash, &value);
    if (!s.ok()) return FromRocks(s, absl::StrCat("blob ", hash));
    return fn(value);
  }
  const int fd = ::open(FilePath(hash).c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::DataLossError(absl::StrCat("blob ", hash, " is missing its file: ", std::strerror(errno)));
  std::string buffer(std::min<size_t>(kChunkBytes, static_cast<size_t>(std::max<int64_t>(1, meta->size_bytes()))),
                     '\0');
  int64_t done = 0;
  absl::Status status;
  while (status.ok() && done < meta->size_bytes()) {
    const ssize_t n = ::read(fd, buffer.data(), buffer.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      status = absl::DataLossError(absl::StrCat("blob ", hash, " file ends early"));
      break;
    }
    done += n;
    status = fn(absl::string_view(buffer.data(), static_cast<size_t>(n)));
  }
  ::close(fd);
  return status;
}

absl::StatusOr<std::string> CasStore::ReadAll(const std::string& hash) const {
  std::string out;
  absl::Status s = Read(hash, [&](absl::string_view chunk) {
    out.append(chunk.data(), chunk.size());
    return absl::OkStatus();
  });
  if (!s.ok()) return s;
  return out;
}

absl::StatusOr<std::unique_ptr<CasStore::Upload>> CasStore::StartUpload(const Digest& digest, bool is_directory) {
  if (!IsSha256Hex(digest.hash())) {
    return absl::InvalidArgumentError(absl::StrCat("'", digest.hash(), "' is not a SHA-256 digest in hex"));
  }
  if (digest.size_bytes() < 0 || static_cast<uint64_t>(digest.size_bytes()) > max_blob_bytes_) {
    return absl::ResourceExhaustedError(absl::StrCat("blob ", Short(digest.hash()), " of ", digest.size_bytes(),
                                                     " bytes is over the limit of ", max_blob_bytes_, " bytes"));
  }
  if (is_directory && static_cast<uint64_t>(digest.size_bytes()) > kFileThreshold) {
    return absl::ResourceExhaustedError(absl::StrCat("directory blob ", Short(digest.hash()), " is over 1 MiB"));
  }
  return std::unique_ptr<Upload>(new Upload(this, digest, is_directory));
}

CasStore::Upload::Upload(CasStore* store, Digest digest, bool is_directory)
    : store_(store),
      digest_(std::move(digest)),
      is_directory_(is_directory),
      to_file_(!is_directory && static_cast<uint64_t>(digest_.size_bytes()) > kFileThreshold),
      to_pack_(!is_directory && !to_file_) {}

CasStore::Upload::~Upload() {
  if (!finished_) Discard();
}

absl::Status CasStore::Upload::Append(absl::string_view data) {
  if (finished_) return absl::FailedPreconditionError("blob already finished");
  received_ += data.size();
  if (received_ > static_cast<uint64_t>(digest_.size_bytes())) {
    return absl::InvalidArgumentError(
        absl::StrCat("blob ", Short(digest_.hash()), " is longer than its digest's ", digest_.size_bytes(), " bytes"));
  }
  hasher_.Update(data);
  if (!to_file_) {
    buffer_.append(data.data(), data.size());
    return absl::OkStatus();
  }
  if (fd_ < 0) {
    // A name of this upload's own: concurrent uploads of one blob never
    // share a temporary file.
    temp_path_ = (std::filesystem::path(store_->files_dir_) / "tmp" /
                  absl::StrCat(digest_.hash(), ".", store_->next_upload_.fetch_add(1)))
                     .string();
    fd_ = ::open(temp_path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0444);
    if (fd_ < 0) return absl::InternalError(absl::StrCat("cannot create ", temp_path_, ": ", std::strerror(errno)));
  }
  for (size_t at = 0; at < data.size();) {
    const ssize_t n = ::write(fd_, data.data() + at, data.size() - at);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return absl::InternalError(absl::StrCat("cannot write ", temp_path_, ": ", std::strerror(errno)));
    at += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

void CasStore::Upload::Discard() {
  finished_ = true;
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  if (!temp_path_.empty()) ::unlink(temp_path_.c_str());
  temp_path_.clear();
}

absl::Status CasStore::Upload::Finish() {
  if (finished_) return absl::FailedPreconditionError("blob already finished");
  absl::ReaderMutexLock gc_lock(&store_->gc_mu_);
  if (received_ != static_cast<uint64_t>(digest_.size_bytes())) {
    Discard();
    return absl::InvalidArgumentError(absl::StrCat("blob ", Short(digest_.hash()), " ended after ", received_, " of ",
                                                   digest_.size_bytes(), " bytes"));
  }
  const std::string got = hasher_.FinishHex();
  if (got != digest_.hash()) {
    Discard();
    return absl::InvalidArgumentError(
        absl::StrCat("blob does not match its digest ", digest_.hash(), " (got ", got, "); nothing was stored"));
  }
  BlobMeta meta;
  meta.set_size_bytes(digest_.size_bytes());
  meta.set_is_directory(is_directory_);
  meta.set_stored_unix(absl::ToUnixSeconds(absl::Now()));
  if (is_directory_) {
    absl::StatusOr<TreeSummary> summary = store_->SummariseDirectory(digest_, buffer_);
    if (!summary.ok()) {
      Discard();
      return summary.status();
    }
    meta.set_tree_bytes(static_cast<int64_t>(summary->bytes));
    meta.set_tree_entries(static_cast<int64_t>(summary->entries));
    meta.set_tree_depth(summary->depth);
    meta.set_link_escape(summary->link_escape);
  }
  if (to_pack_) {
    // One upload of a given small file at a time from here to its meta (see
    // packing_); the released claim wakes the next, which finds it stored.
    absl::MutexLock lock(&store_->pack_mu_);
    const std::string& hash = digest_.hash();
    CasStore* const store = store_;
    const auto free_to_pack = [store, &hash]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(store->pack_mu_) {
      return !store->packing_.contains(hash);
    };
    store_->pack_mu_.Await(absl::Condition(&free_to_pack));
    store_->packing_.insert(hash);
  }
  absl::Cleanup release_claim = [this] {
    if (!to_pack_) return;
    absl::MutexLock lock(&store_->pack_mu_);
    store_->packing_.erase(digest_.hash());
  };
  // Already there (as a directory, if this is one): keep the stored copy.
  absl::StatusOr<BlobMeta> existing = store_->Meta(digest_.hash());
  if (existing.ok() && (existing->is_directory() || !is_directory_)) {
    already_present_ = true;
    Discard();
    return absl::OkStatus();
  }
  rocksdb::WriteBatch batch;
  if (to_file_) {
    // The bytes reach their final name before the meta makes them visible.
    if (store_->sync_ && ::fsync(fd_) != 0) {
      Discard();
      return absl::InternalError(absl::StrCat("cannot sync ", temp_path_, ": ", std::strerror(errno)));
    }
    ::close(fd_);
    fd_ = -1;
    const std::string path = store_->FilePath(digest_.hash());
    std::error_code ec;
    std::filesystem::create_directories(std::filesystem::path(path).parent_path(), ec);
    if (::rename(temp_path_.c_str(), path.c_str()) != 0) {
      const std::string why = std::strerror(errno);
      Discard();
      return absl::InternalError(absl::StrCat("cannot store blob ", Short(digest_.hash()), ": ", why));
    }
    temp_path_.clear();
    meta.set_in_file(true);
  } else if (to_pack_) {
    if (absl::Status s = store_->AppendToPack(buffer_, meta); !s.ok()) {
      Discard();
      return s;
    }
  } else {
    batch.Put(store_->blobs_, digest_.hash(), buffer_);
  }
  batch.Put(store_->meta_, digest_.hash(), meta.SerializeAsString());
  rocksdb::WriteOptions options;
  options.sync = store_->sync_;
  rocksdb::Status s = store_->db_->Write(options, &batch);
  if (!s.ok()) {
    if (meta.pack() != 0) store_->ReleasePackRange(meta.pack(), meta.pack_offset(), buffer_.size());
    Discard();
    return FromRocks(s, "blob write");
  }
  finished_ = true;
  buffer_.clear();
  store_->total_bytes_ += static_cast<uint64_t>(digest_.size_bytes());
  return absl::OkStatus();
}

absl::Status CasStore::Put(const Digest& digest, absl::string_view data, bool is_directory, bool* stored) {
  absl::StatusOr<std::unique_ptr<Upload>> upload = StartUpload(digest, is_directory);
  if (!upload.ok()) return upload.status();
  for (size_t at = 0; at < data.size(); at += kChunkBytes) {
    RETURN_IF_ERROR((*upload)->Append(data.substr(at, kChunkBytes)));
  }
  absl::Status s = (*upload)->Finish();
  if (stored != nullptr) *stored = s.ok() && !(*upload)->already_present();
  return s;
}

absl::StatusOr<TreeSummary> CasStore::SummariseDirectory(const Digest& digest, absl::string_view data) const {
  // Per-directory checks only; limits of the whole tree are the submitter's.
  SourceTreeLimits per_directory;
  per_directory.max_entries_per_directory = 100000;
  absl::StatusOr<kiln::v1::Directory> dir = ParseCanonicalDirectory(data, per_directory);
  if (!dir.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("directory ", Short(digest.hash()), ": ", dir.status().message()));
  }
  TreeSummary sum;
  sum.bytes = data.size();
  sum.entries = static_cast<uint64_t>(dir->files_size() + dir->directories_size() + dir->symlinks_size());
  for (const auto& file : dir->files()) {
    if (!HasFile(file.digest())) {
      return absl::FailedPreconditionError(absl::StrCat("directory ", Short(digest.hash()), " names file '",
                                                        file.name(), "' (", Short(file.digest().hash()),
                                                        "), which is not stored: upload files before directories"));
    }
    sum.bytes += static_cast<uint64_t>(file.digest().size_bytes());
  }
  for (const auto& child : dir->directories()) {
    absl::StatusOr<BlobMeta> meta = Meta(child.digest().hash());
    if (!meta.ok() || !meta->is_directory() || meta->size_bytes() != child.digest().size_bytes()) {
      return absl::FailedPreconditionError(absl::StrCat("directory ", Short(digest.hash()), " names directory '",
                                                        child.name(), "' (", Short(child.digest().hash()),
                                                        "), which is not stored: upload children first"));
    }
    sum.bytes += static_cast<uint64_t>(meta->tree_bytes());
    sum.entries += static_cast<uint64_t>(meta->tree_entries());
    sum.depth = std::max(sum.depth, meta->tree_depth() + 1);
    sum.link_escape = std::max(sum.link_escape, std::max(0, meta->link_escape() - 1));
  }
  for (const auto& link : dir->symlinks()) sum.link_escape = std::max(sum.link_escape, LinkEscape(link.target()));
  return sum;
}

}  // namespace kiln
