#include "coordinator/object_farm_store.h"

#include <unistd.h>

#include <filesystem>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/nix_hash.h"
#include "common/status_macros.h"

namespace kiln {
namespace {

constexpr char kBucketCacheInfo[] = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n";

// nar/BASE32.nar.zst, as narinfos name the bodies.
bool IsBodyName(absl::string_view name) {
  const absl::string_view digits = absl::StripSuffix(name, kCompressedNarSuffix);
  return digits.size() == 52 && digits.size() != name.size() && DecodeNixBase32(digits, 32).ok();
}

std::string NarInfoKey(const NarInfo& info) {
  absl::StatusOr<std::string> hash_part = StorePathHashPart(info.store_path);
  return absl::StrCat(hash_part.ok() ? *hash_part : "invalid", ".narinfo");
}

}  // namespace

absl::StatusOr<std::unique_ptr<ObjectFarmStore>> ObjectFarmStore::Open(rocksdb::DB* db,
                                                                       rocksdb::ColumnFamilyHandle* family,
                                                                       std::unique_ptr<ObjectStore> objects,
                                                                       SigningKey key, std::string staging_dir,
                                                                       bool sync, const Clock* clock) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(staging_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", staging_dir, ": ", ec.message()));
  for (const auto& entry : fs::directory_iterator(staging_dir, ec)) {
    if (absl::StartsWith(entry.path().filename().string(), ".upload-")) fs::remove(entry.path(), ec);
  }
  RETURN_IF_ERROR_CONTEXT(objects->Put("nix-cache-info", kBucketCacheInfo, "text/x-nix-cache-info"),
                          "the farm store's bucket");
  auto store = std::unique_ptr<ObjectFarmStore>(
      new ObjectFarmStore(db, family, std::move(objects), std::move(key), std::move(staging_dir), sync, clock));
  RETURN_IF_ERROR(store->LoadRecords().status());
  return store;
}

absl::StatusOr<NarLocation> ObjectFarmStore::LocateNar(absl::string_view name) {
  if (!IsBodyName(name)) return absl::NotFoundError("no such NAR");
  ASSIGN_OR_RETURN(std::string url, objects_->PresignedUrl("GET", absl::StrCat("nar/", name), kReadUrlLifetime));
  return NarLocation{.file = "", .url = std::move(url)};
}

absl::Status ObjectFarmStore::ReadNar(absl::string_view name, absl::FunctionRef<absl::Status(absl::string_view)> sink) {
  if (!IsBodyName(name)) return absl::NotFoundError("no such NAR");
  return objects_->Get(absl::StrCat("nar/", name), sink);
}

void ObjectFarmStore::BodyStored(const NarInfo& info) {
  absl::MutexLock lock(&mu_);
  stored_at_[info.store_path] = removals_;
}

absl::Status ObjectFarmStore::StoreBody(NarInfo& info, NarSource nar) {
  ASSIGN_OR_RETURN(CompressedNar compressed, CompressCheckedNar(info, nar, staging_dir_, /*sync=*/false));
  const absl::Status put =
      objects_->PutFile(absl::StrCat("nar/", compressed.name), compressed.file, "application/x-nix-nar");
  ::unlink(compressed.file.c_str());
  RETURN_IF_ERROR(put);
  info.url = absl::StrCat("nar/", compressed.name);
  info.compression = "zstd";
  info.file_hash = compressed.file_hash;
  info.file_size = compressed.file_size;
  info.nar_hash = compressed.nar_hash;
  BodyStored(info);
  return absl::OkStatus();
}

absl::StatusOr<std::string> ObjectFarmStore::DirectUploadUrl(const NarInfo& info) {
  const absl::string_view name = absl::StripPrefix(info.url, "nar/");
  if (!IsBodyName(name) || name.size() == info.url.size()) {
    return absl::InvalidArgumentError("a direct upload's URL is nar/FILEHASH.nar.zst");
  }
  ASSIGN_OR_RETURN(NixHash file_hash, ParseNixHash(info.file_hash));
  if (file_hash.algo != HashAlgo::kSha256 || absl::StrCat(file_hash.Base32(), kCompressedNarSuffix) != name) {
    return absl::InvalidArgumentError("a direct upload is named by the SHA-256 of its compressed bytes");
  }
  return objects_->PresignedUrl("PUT", info.url, kUploadUrlLifetime);
}

absl::Status ObjectFarmStore::CommitDirectUpload(const NarInfo& announced) {
  ASSIGN_OR_RETURN(NarInfo stored, NormalizeAnnounced(announced));
  ASSIGN_OR_RETURN(NixHash nar_hash, ParseNixHash(announced.nar_hash));
  if (nar_hash.algo != HashAlgo::kSha256) return absl::InvalidArgumentError("nar_hash: a SHA-256 is needed");
  stored.nar_hash = absl::StrCat("sha256:", nar_hash.Base32());
  stored.url = announced.url;
  stored.compression = "zstd";
  stored.file_hash = announced.file_hash;
  stored.file_size = announced.file_size;
  RETURN_IF_ERROR(DirectUploadUrl(stored).status());  // The same checks of the name.
  ASSIGN_OR_RETURN(const std::string hash_part, StorePathHashPart(stored.store_path));
  RETURN_IF_ERROR(CheckReferences(stored));
  ASSIGN_OR_RETURN(bool begun, BeginAdd(hash_part));
  if (!begun) return absl::OkStatus();
  absl::Status status = absl::OkStatus();
  absl::StatusOr<uint64_t> size = objects_->Size(stored.url);
  if (absl::IsNotFound(size.status())) {
    status = absl::FailedPreconditionError(
        absl::StrCat("the body of ", stored.store_path, " is not in the bucket: upload it first"));
  } else if (!size.ok()) {
    status = size.status();
  } else if (*size != stored.file_size) {
    status = absl::DataLossError(absl::StrCat("the body of ", stored.store_path, " in the bucket is ", *size,
                                              " bytes, not the ", stored.file_size, " announced"));
  } else {
    BodyStored(stored);
  }
  status = FinishAdd(hash_part, stored, status);
  if (status.ok()) Touch(hash_part, stored);
  return status;
}

absl::Status ObjectFarmStore::CheckBodyKept(const NarInfo& info) {
  auto it = stored_at_.find(info.store_path);
  const bool kept = it != stored_at_.end() && it->second == removals_;
  if (it != stored_at_.end()) stored_at_.erase(it);
  if (!kept) {
    return absl::AbortedError(
        absl::StrCat("the NAR of ", info.store_path, " may have been collected meanwhile: send it again"));
  }
  return absl::OkStatus();
}

absl::Status ObjectFarmStore::Publish(const NarInfo& info) {
  ASSIGN_OR_RETURN(NarInfo signed_info, SignNarInfo(info, key_));
  return objects_->Put(NarInfoKey(info), signed_info.Render(), "text/x-nix-narinfo");
}

void ObjectFarmStore::Unpublish(const NarInfo& info) {
  (void)objects_->Delete(NarInfoKey(info));  // Best effort: the body stays, so the path stays whole.
}

absl::Time ObjectFarmStore::LastUsed(const std::string& hash_part, const NarInfo&) {
  auto it = touched_.find(hash_part);
  return it == touched_.end() ? opened_ : it->second;
}

void ObjectFarmStore::Touch(const std::string& hash_part, const NarInfo&) {
  const absl::Time now = clock_->Now();
  absl::MutexLock lock(&mu_);
  touched_[hash_part] = now;
}

void ObjectFarmStore::RemoveBodies(const std::vector<std::string>& files, const std::vector<NarInfo>& collected) {
  // Narinfos first: a reader of the bucket never finds one whose body is gone.
  for (const NarInfo& info : collected) {
    (void)objects_->Delete(NarInfoKey(info));
    if (absl::StatusOr<std::string> h = StorePathHashPart(info.store_path); h.ok()) touched_.erase(*h);
  }
  for (const std::string& f : files) (void)objects_->Delete(absl::StrCat("nar/", f));
  if (!files.empty()) ++removals_;
}

}  // namespace kiln
