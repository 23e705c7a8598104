#include "coordinator/fod_cache.h"

#include <memory>

#include <rocksdb/write_batch.h>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/digest.h"
#include "common/grpc_util.h"
#include "common/nix_hash.h"
#include "coordinator/rocks_status.h"
#include "common/status_macros.h"

namespace kiln {

using kiln::v1::FodEntry;
using kiln::v1::FodVerdict;

namespace {

// Keys and hashes come from workers and imports: both are checked before
// anything is stored.
absl::Status CheckKeyAndHash(const std::string& key, const std::string& hash) {
  if (!IsSha256Hex(key)) return absl::InvalidArgumentError(absl::StrCat("'", key, "' is not a FOD key"));
  absl::StatusOr<NixHash> parsed = ParseNixHash(hash);
  if (!parsed.ok()) return parsed.status();
  if (parsed->Sri() != hash) return absl::InvalidArgumentError(absl::StrCat("'", hash, "' is not in SRI form"));
  return absl::OkStatus();
}

}  // namespace

FodCache::FodCache(rocksdb::DB* db, rocksdb::ColumnFamilyHandle* entries, rocksdb::ColumnFamilyHandle* names,
                   const Clock* clock, bool sync)
    : db_(db), entries_(entries), names_(names), clock_(clock), sync_(sync) {}

std::string FodCache::NameKey(const std::string& name, const std::string& hash) {
  return absl::StrCat(name, std::string(1, '\0'), hash);
}

absl::Status FodCache::Write(rocksdb::WriteBatch& batch) {
  rocksdb::WriteOptions options;
  options.sync = sync_;
  return FromRocks(db_->Write(options, &batch), "FOD cache write");
}

absl::StatusOr<bool> FodCache::Get(const std::string& key, FodEntry* entry) const {
  std::string value;
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), entries_, key, &value);
  if (s.IsNotFound()) return false;
  if (!s.ok()) return FromRocks(s, "FOD cache read");
  if (!entry->ParseFromString(value)) return absl::DataLossError(absl::StrCat("FOD entry ", key, " is corrupt"));
  return true;
}

absl::StatusOr<std::vector<FodVerdict>> FodCache::Check(const std::vector<kiln::v1::FodRef>& fods) {
  std::vector<FodVerdict> verdicts(fods.size());
  rocksdb::WriteBatch hits;
  absl::MutexLock lock(&mu_);
  const auto now = ToProtoTime(clock_->Now());
  for (size_t i = 0; i < fods.size(); ++i) {
    const kiln::v1::FodRef& fod = fods[i];
    FodVerdict& v = verdicts[i];
    FodEntry entry;
    absl::StatusOr<bool> found = Get(fod.key(), &entry);
    if (!found.ok()) return found.status();
    if (*found) {
      v.set_kind(entry.nondeterministic()         ? FodVerdict::KIND_NONDETERMINISTIC
                 : entry.hash() == fod.declared() ? FodVerdict::KIND_RIGHT
                                                  : FodVerdict::KIND_WRONG);
      entry.set_hit_count(entry.hit_count() + 1);
      if (v.kind() == FodVerdict::KIND_RIGHT) *entry.mutable_last_verified() = now;
      hits.Put(entries_, fod.key(), entry.SerializeAsString());
      *v.mutable_entry() = std::move(entry);
      continue;
    }
    // Unknown key. Was the declared hash computed for another key of this
    // name? Then the inputs changed and the hash did not.
    std::string other_key;
    rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), names_, NameKey(fod.name(), fod.declared()), &other_key);
    if (!s.ok() && !s.IsNotFound()) return FromRocks(s, "FOD cache read");
    FodEntry other;
    if (s.ok() && other_key != fod.key()) {
      absl::StatusOr<bool> known = Get(other_key, &other);
      if (!known.ok()) return known.status();
      if (*known) {
        v.set_kind(FodVerdict::KIND_SUSPECT_STALE);
        *v.mutable_stale_source() = std::move(other);
        continue;
      }
    }
    v.set_kind(FodVerdict::KIND_UNKNOWN);
  }
  if (hits.Count() > 0) {
    RETURN_IF_ERROR(Write(hits));
  }
  return verdicts;
}

absl::StatusOr<std::vector<std::string>> FodCache::Record(const std::vector<kiln::v1::FodOutcome>& outcomes,
                                                          const std::string& job_id, const std::string& worker) {
  std::vector<std::string> nondeterministic;
  rocksdb::WriteBatch batch;
  absl::MutexLock lock(&mu_);
  const auto now = ToProtoTime(clock_->Now());
  // Several outcomes of one report may name the same key.
  absl::flat_hash_map<std::string, FodEntry> touched;
  for (const kiln::v1::FodOutcome& outcome : outcomes) {
    const kiln::v1::FodRef& fod = outcome.fod();
    RETURN_IF_ERROR(CheckKeyAndHash(fod.key(), outcome.got()));
    if (absl::StatusOr<NixHash> got = ParseNixHash(outcome.got()); got.ok() && got->IsFake()) {
      return absl::InvalidArgumentError(absl::StrCat("a build cannot produce the fake hash ", outcome.got()));
    }
    auto it = touched.find(fod.key());
    if (it == touched.end()) {
      FodEntry entry;
      absl::StatusOr<bool> found = Get(fod.key(), &entry);
      if (!found.ok()) return found.status();
      if (!*found) {
        entry.set_key(fod.key());
        entry.set_name(fod.name());
        entry.set_hash(outcome.got());
        entry.set_algo(fod.algo());
        entry.set_mode(fod.mode());
        *entry.mutable_first_computed() = now;
        entry.set_computed_by_job(job_id);
        entry.set_computed_by_worker(worker);
        entry.set_build_seconds(outcome.build_seconds());
        entry.set_drv_path(fod.drv_path());
      }
      it = touched.emplace(fod.key(), std::move(entry)).first;
    }
    FodEntry& entry = it->second;
    if (entry.hash() == outcome.got()) {
      *entry.mutable_last_verified() = now;
      if (entry.build_seconds() == 0) entry.set_build_seconds(outcome.build_seconds());
    } else if (!entry.nondeterministic()) {
      entry.set_nondeterministic(true);
      entry.set_other_hash(outcome.got());
      nondeterministic.push_back(fod.key());
    }
    batch.Put(names_, NameKey(fod.name(), outcome.got()), fod.key());
  }
  for (const auto& [key, entry] : touched) batch.Put(entries_, key, entry.SerializeAsString());
  RETURN_IF_ERROR(Write(batch));
  return nondeterministic;
}

absl::StatusOr<std::vector<FodEntry>> FodCache::List(const std::string& name, const std::string& key_prefix,
                                                     uint32_t limit) const {
  std::vector<FodEntry> out;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), entries_));
  for (it->Seek(key_prefix); it->Valid() && it->key().starts_with(key_prefix); it->Next()) {
    FodEntry entry;
    if (!entry.ParseFromArray(it->value().data(), static_cast<int>(it->value().size()))) {
      return absl::DataLossError(absl::StrCat("FOD entry ", it->key().ToString(), " is corrupt"));
    }
    if (!name.empty() && entry.name() != name) continue;
    out.push_back(std::move(entry));
    if (limit != 0 && out.size() >= limit) break;
  }
  if (!it->status().ok()) return FromRocks(it->status(), "FOD cache scan");
  return out;
}

absl::StatusOr<uint32_t> FodCache::Forget(const std::vector<std::string>& key_prefixes, const std::string& name) {
  std::vector<FodEntry> doomed;
  for (const std::string& prefix : key_prefixes) {
    if (prefix.empty()) return absl::InvalidArgumentError("an empty key prefix would match every entry");
    absl::StatusOr<std::vector<FodEntry>> matches = List("", prefix, 2);
    if (!matches.ok()) return matches.status();
    if (matches->empty()) return absl::NotFoundError(absl::StrCat("no FOD entry has a key starting with ", prefix));
    if (matches->size() > 1) {
      return absl::InvalidArgumentError(absl::StrCat("key prefix ", prefix, " names more than one entry"));
    }
    doomed.push_back(std::move(matches->front()));
  }
  if (!name.empty()) {
    absl::StatusOr<std::vector<FodEntry>> named = List(name, "", 0);
    if (!named.ok()) return named.status();
    for (FodEntry& e : *named) doomed.push_back(std::move(e));
  }
  rocksdb::WriteBatch batch;
  absl::MutexLock lock(&mu_);
  for (const FodEntry& e : doomed) {
    batch.Delete(entries_, e.key());
    // The name index rows that point at this key go too.
    for (const std::string& hash : {e.hash(), e.other_hash()}) {
      if (hash.empty()) continue;
      std::string pointed;
      if (db_->Get(rocksdb::ReadOptions(), names_, NameKey(e.name(), hash), &pointed).ok() && pointed == e.key()) {
        batch.Delete(names_, NameKey(e.name(), hash));
      }
    }
  }
  RETURN_IF_ERROR(Write(batch));
  return static_cast<uint32_t>(doomed.size());
}

absl::StatusOr<kiln::v1::ImportFodsResponse> FodCache::Import(const std::vector<FodEntry>& entries) {
  kiln::v1::ImportFodsResponse response;
  rocksdb::WriteBatch batch;
  absl::MutexLock lock(&mu_);
  absl::flat_hash_map<std::string, FodEntry> touched;
  for (const FodEntry& incoming : entries) {
    if (absl::Status s = CheckKeyAndHash(incoming.key(), incoming.hash()); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("entry ", touched.size() + response.skipped(), ": ", s.message()));
    }
    auto it = touched.find(incoming.key());
    FodEntry existing;
    bool found = it != touched.end();
    if (found) {
      existing = it->second;
    } else {
      absl::StatusOr<bool> stored = Get(incoming.key(), &existing);
      if (!stored.ok()) return stored.status();
      found = *stored;
    }
    if (!found) {
      touched[incoming.key()] = incoming;
      response.set_imported(response.imported() + 1);
    } else if (existing.hash() == incoming.hash()) {
      response.set_skipped(response.skipped() + 1);
      continue;
    } else {
      if (!existing.nondeterministic()) {
        existing.set_nondeterministic(true);
        existing.set_other_hash(incoming.hash());
      }
      touched[incoming.key()] = existing;
      response.set_conflicts(response.conflicts() + 1);
    }
    batch.Put(names_, NameKey(incoming.name(), incoming.hash()), incoming.key());
  }
  for (const auto& [key, entry] : touched) batch.Put(entries_, key, entry.SerializeAsString());
  RETURN_IF_ERROR(Write(batch));
  return response;
}

uint64_t FodCache::size() const {
  uint64_t n = 0;
  db_->GetIntProperty(entries_, "rocksdb.estimate-num-keys", &n);
  return n;
}

}  // namespace kiln
