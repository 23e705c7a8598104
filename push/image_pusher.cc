#include "push/image_pusher.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <deque>
#include <filesystem>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/digest.h"
#include "common/json_fields.h"
#include "common/net.h"
#include "common/source_tree.h"
#include "common/subprocess.h"
#include "push/docker_archive.h"
#include "push/layer_gzip.h"
#include "common/status_macros.h"

namespace kiln {
namespace {

// Docker v2 schema 2 (what skopeo pushes from a docker-archive) and OCI.
struct MediaTypes {
  const char* manifest;
  const char* config;
  const char* layer;
};
constexpr MediaTypes kDocker = {"application/vnd.docker.distribution.manifest.v2+json",
                                "application/vnd.docker.container.image.v1+json",
                                "application/vnd.docker.image.rootfs.diff.tar.gzip"};
constexpr MediaTypes kOci = {"application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.config.v1+json",
                             "application/vnd.oci.image.layer.v1.tar+gzip"};

}  // namespace

LayerCache::LayerCache(std::string path) : path_(std::move(path)) {
  if (path_.empty()) return;
  std::string text;
  if (!ReadWholeFile(path_, text).ok()) return;
  nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
  if (!j.is_object()) return;  // A cache: a bad file only costs time.
  absl::MutexLock lock(&mu_);
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.value().is_object()) {
      entries_[it.key()] = Entry{JsonString(it.value(), "digest"), JsonInt<uint64_t>(it.value(), "size", 0),
                                 JsonString(it.value(), "seen_in")};
    }
  }
}

bool LayerCache::Find(const std::string& diff_id, int level, Entry* entry) const {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(absl::StrCat(GzipLevelName(level), ":", diff_id));
  if (it == entries_.end() || it->second.digest.empty()) return false;
  *entry = it->second;
  return true;
}

std::string LayerCache::SeenIn(const std::string& digest) const {
  absl::MutexLock lock(&mu_);
  for (const auto& [key, entry] : entries_) {
    if (entry.digest == digest) return entry.seen_in;
  }
  return "";
}

void LayerCache::Put(const std::string& diff_id, int level, Entry entry) {
  absl::MutexLock lock(&mu_);
  entries_[absl::StrCat(GzipLevelName(level), ":", diff_id)] = std::move(entry);
}

absl::Status LayerCache::Save() const {
  if (path_.empty()) return absl::OkStatus();
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(path_).parent_path(), ec);
  nlohmann::json j = nlohmann::json::object();
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [k, e] : entries_) j[k] = {{"digest", e.digest}, {"size", e.size}, {"seen_in", e.seen_in}};
  }
  return WriteFileAtomically(path_, j.dump() + "\n");
}

namespace {

absl::StatusOr<PushedBlob> Pushed(absl::StatusOr<CompressedLayer> layer) {
  if (!layer.ok()) return layer.status();
  return PushedBlob{std::move(layer->digest), layer->size, false};
}

// Sends layer i's compressed blob: from `held` when the bytes are in
// memory, else from the layer's "gz" scratch file. Adds what it uploaded to
// the last argument.
using SendLayer = std::function<absl::Status(size_t, PushedBlob, std::string* held, RegistryClient&, uint64_t*)>;

// A layer's compressed scratch file.
std::string ScratchFile(const std::string& scratch, size_t i) { return absl::StrCat(scratch, "/layer-", i, ".gz"); }

// Compressed layers up to this size pass to the sending threads in memory;
// larger ones go through scratch files. (Writing every layer to disk and
// reading it back cost a fifth of a push's CPU.) The bound keeps memory to
// a few times this per sending thread.
constexpr size_t kHeldLayerBytes = size_t{16} << 20;

// Bytes of one layer: in memory until they pass kHeldLayerBytes, then in
// `path` (what was held written first).
class LayerBytes {
 public:
  explicit LayerBytes(std::string path) : path_(std::move(path)) {}
  ~LayerBytes() { Close().IgnoreError(); }
  absl::Status Append(absl::string_view data) {
    if (file_ == nullptr && held_.size() + data.size() <= kHeldLayerBytes) {
      held_.append(data.data(), data.size());
      return absl::OkStatus();
    }
    if (file_ == nullptr) {
      file_ = std::fopen(path_.c_str(), "wb");
      if (file_ == nullptr) return absl::InternalError(absl::StrCat("cannot create ", path_));
      if (!Write(held_)) return absl::InternalError(absl::StrCat("cannot write ", path_));
      held_.clear();
      held_.shrink_to_fit();
    }
    if (!Write(data)) return absl::InternalError(absl::StrCat("cannot write ", path_));
    return absl::OkStatus();
  }
  // Ends the writing; the bytes are then held() or in the file.
  absl::Status Close() {
    if (file_ == nullptr) return absl::OkStatus();
    const bool ok = std::fclose(file_) == 0;
    file_ = nullptr;
    in_file_ = true;
    return ok ? absl::OkStatus() : absl::InternalError(absl::StrCat("cannot write ", path_));
  }
  bool in_file() const { return in_file_; }
  std::string& held() { return held_; }

 private:
  bool Write(absl::string_view data) { return std::fwrite(data.data(), 1, data.size(), file_) == data.size(); }
  std::string path_;
  std::string held_;
  std::FILE* file_ = nullptr;
  bool in_file_ = false;
};

// The archive is read in one pass on the calling thread, each wanted layer
// written as it is read into a LayerGzip whose members a pool of
// `options.parallel` threads compresses: reading, compressing and sending
// overlap, even within one big layer. A compressed layer (in memory up to
// kHeldLayerBytes, else a scratch file) goes to one of `options.parallel`
// sending threads, each with a registry client of its own. At most twice
// as many compressed layers as senders wait.
absl::Status CompressInParallel(const std::string& archive, const DockerArchive& image,
                                const std::vector<bool>& compress, const PushOptions& options,
                                const std::string& scratch, const SendLayer& send, PushReport& report) {
  GzipMemberPool pool(options.gzip_level, options.parallel);
  struct Compressed {
    size_t index;
    PushedBlob blob;
    std::unique_ptr<LayerBytes> bytes;
  };
  absl::Mutex mu;
  std::deque<Compressed> ready;  // Guarded by mu.
  bool reading_done = false;     // Guarded by mu.
  absl::Status failed;           // The first error; guarded by mu.
  uint64_t uploaded = 0;         // Guarded by mu.
  const auto fail = [&](absl::Status s) {
    absl::MutexLock lock(&mu);
    if (failed.ok()) failed = std::move(s);
  };
  std::vector<std::thread> senders;
  for (int t = 0; t < options.parallel; ++t) {
    senders.emplace_back([&] {
      std::unique_ptr<RegistryClient> client = options.make_client();
      for (;;) {
        Compressed layer;
        {
          absl::MutexLock lock(&mu);
          const auto work_or_end = [&] { return !ready.empty() || reading_done || !failed.ok(); };
          mu.Await(absl::Condition(&work_or_end));
          if (!failed.ok() || ready.empty()) return;
          layer = std::move(ready.front());
          ready.pop_front();
        }
        uint64_t sent = 0;
        LayerBytes& bytes = *layer.bytes;
        if (absl::Status s = send(layer.index, layer.blob, bytes.in_file() ? nullptr : &bytes.held(), *client, &sent);
            !s.ok()) {
          return fail(s);
        }
        absl::MutexLock lock(&mu);
        uploaded += sent;
      }
    });
  }
  // The layer being read: its compressed bytes, and the writer filling them.
  std::unique_ptr<LayerBytes> bytes;
  std::unique_ptr<LayerGzip> gz;
  const auto open_for = [&](size_t i) -> absl::Status {
    if (gz) return absl::OkStatus();
    bytes = std::make_unique<LayerBytes>(ScratchFile(scratch, i));
    gz = std::make_unique<LayerGzip>();
    return gz->OpenSink([b = bytes.get()](absl::string_view piece) { return b->Append(piece); }, options.gzip_level,
                        &pool);
  };
  absl::Status read = StreamLayers(
      archive, image, [&](size_t i) { return compress[i]; },
      [&](size_t i, absl::string_view data) -> absl::Status {
        absl::Status s = open_for(i);
        return s.ok() ? gz->Write(data) : s;
      },
      [&](size_t i) -> absl::Status {
        RETURN_IF_ERROR(open_for(i));  // An empty layer has had no chunk.
        absl::StatusOr<PushedBlob> blob = Pushed(gz->Finish());
        gz.reset();
        if (!blob.ok()) return blob.status();
        RETURN_IF_ERROR(bytes->Close());
        absl::MutexLock lock(&mu);
        ready.push_back(Compressed{i, *std::move(blob), std::move(bytes)});
        // Bound the compressed layers waiting; stop reading once a sender failed.
        const size_t bound = static_cast<size_t>(2 * options.parallel);
        const auto room = [&] { return ready.size() < bound || !failed.ok(); };
        mu.Await(absl::Condition(&room));
        return failed;
      });
  gz.reset();
  bytes.reset();
  if (!read.ok()) fail(read);
  {
    absl::MutexLock lock(&mu);
    reading_done = true;
  }
  for (auto& t : senders) t.join();
  report.bytes_uploaded += uploaded;
  return failed;
}

// The config, then the manifest under every tag, once the layers are in.
// A blob the layer cache last saw in `seen_in` (registry/repository): when
// that is another repository of `ref`'s registry, links it into `ref`'s by
// a cross-repository mount. True when the registry did (nothing to send).
absl::StatusOr<bool> MountFromElsewhere(RegistryClient& via, const ImageRef& ref, const std::string& digest,
                                        const std::string& seen_in) {
  const std::string prefix = absl::StrCat(ref.registry, "/");
  if (!absl::StartsWith(seen_in, prefix) || seen_in == absl::StrCat(prefix, ref.repository)) return false;
  return via.MountBlob(ref.repository, digest, seen_in.substr(prefix.size()));
}

// The manifest naming report.config and report.layers, as sent.
std::string ManifestBody(const PushReport& report, const PushOptions& options) {
  const MediaTypes& types = options.oci_manifest ? kOci : kDocker;
  nlohmann::json manifest = {
      {"schemaVersion", 2},
      {"mediaType", types.manifest},
      {"config", {{"mediaType", types.config}, {"size", report.config.size}, {"digest", report.config.digest}}},
      {"layers", nlohmann::json::array()},
  };
  for (const PushedBlob& l : report.layers) {
    manifest["layers"].push_back({{"mediaType", types.layer}, {"size", l.size}, {"digest", l.digest}});
  }
  return manifest.dump(3);
}

// The manifest under every tag, checking the digest the registry reports.
// `skip_current`: leave out tags that already name this very manifest.
absl::Status PutTags(const std::string& body, const ImageRef& ref, const std::vector<std::string>& tags,
                     RegistryClient& client, const PushOptions& options, PushReport& report,
                     const std::set<std::string>& skip = {}) {
  const MediaTypes& types = options.oci_manifest ? kOci : kDocker;
  report.manifest_size = body.size();
  const std::string expected = absl::StrCat("sha256:", Sha256Hex(body));
  for (const std::string& tag : tags) {
    if (skip.contains(tag)) continue;
    absl::StatusOr<std::string> digest = client.PutManifest(ref.repository, tag, types.manifest, body);
    if (!digest.ok()) return digest.status();
    if (!digest->empty() && *digest != expected) {
      return absl::DataLossError(
          absl::StrCat("registry ", ref.registry, " stored the manifest as ", *digest, ", expected ", expected));
    }
  }
  report.manifest_digest = expected;
  return absl::OkStatus();
}

// The config blob (sent unless the registry has it), then the manifest.
absl::Status FinishImage(const DockerArchive& image, const ImageRef& ref, const std::vector<std::string>& tags,
                         RegistryClient& client, const PushOptions& options, PushReport& report) {
  const std::string& repo = ref.repository;
  report.config = PushedBlob{absl::StrCat("sha256:", Sha256Hex(image.config)), image.config.size(), false};
  absl::StatusOr<bool> has_config = client.HasBlob(repo, report.config.digest);
  if (!has_config.ok()) return has_config.status();
  report.config.skipped = *has_config;
  if (!*has_config) {
    BlobSource source{.file = "", .data = image.config, .size = image.config.size()};
    RETURN_IF_ERROR(client.UploadBlob(repo, report.config.digest, source));
    report.bytes_uploaded += image.config.size();
  }
  return PutTags(ManifestBody(report, options), ref, tags, client, options, report);
}

}  // namespace

absl::StatusOr<PushReport> PushDockerArchive(const std::string& archive, const ImageRef& ref,
                                             std::vector<std::string> tags, RegistryClient& client,
                                             const PushOptions& options) {
  if (tags.empty() && !ref.tag.empty()) tags.push_back(ref.tag);
  if (tags.empty()) return absl::InvalidArgumentError(absl::StrCat(ref.ToString(), ": no tag to push"));
  absl::StatusOr<DockerArchive> image = ReadDockerArchive(archive);
  if (!image.ok()) return image.status();
  PushReport report;
  report.tags = tags;
  const std::string& repo = ref.repository;

  // Which layers the registry already has, for those whose compressed
  // digest is known.
  report.layers.resize(image->layers.size());
  std::vector<bool> compress(image->layers.size(), true);
  std::vector<size_t> cached;
  std::vector<std::string> seen_in(image->layers.size());
  const std::string here = absl::StrCat(ref.registry, "/", repo);
  for (size_t i = 0; i < image->layers.size(); ++i) {
    LayerCache::Entry entry;
    if (options.cache != nullptr && options.cache->Find(image->layers[i].diff_id, options.gzip_level, &entry)) {
      report.layers[i] = PushedBlob{entry.digest, entry.size, false, false};
      seen_in[i] = entry.seen_in;
      cached.push_back(i);
    }
  }
  // Every layer's compressed digest known: the manifest they make is known
  // too. Tags that already name it need nothing; when one does not, and the
  // repository holds that manifest anyway, it holds the whole image (a
  // registry takes a manifest only with all its blobs): only tags are sent.
  if (!cached.empty() && cached.size() == image->layers.size()) {
    report.config = PushedBlob{absl::StrCat("sha256:", Sha256Hex(image->config)), image->config.size(), true};
    const std::string body = ManifestBody(report, options);
    const std::string digest = absl::StrCat("sha256:", Sha256Hex(body));
    const std::string& type = (options.oci_manifest ? kOci : kDocker).manifest;
    std::set<std::string> current;
    for (const std::string& tag : tags) {
      absl::StatusOr<std::string> at = client.ManifestDigest(repo, tag, type);
      if (!at.ok()) return at.status();
      if (*at == digest)
        current.insert(tag);
      else
        break;  // One tag to move: the image check below decides.
    }
    bool whole = current.size() == tags.size();
    if (!whole) {
      absl::StatusOr<std::string> held = client.ManifestDigest(repo, digest, type);
      if (!held.ok()) return held.status();
      whole = *held == digest;
    }
    if (whole) {
      for (size_t i = 0; i < report.layers.size(); ++i) {
        report.layers[i].skipped = true;
        if (options.on_layer) options.on_layer(i + 1, 0);
      }
      RETURN_IF_ERROR(PutTags(body, ref, tags, client, options, report, current));
      return report;
    }
  }
  // One HEAD per cached layer, spread over several clients when there are.
  // (Each thread records into its layers' `skipped`; `compress`, a
  // vector<bool> whose elements share words, is derived afterwards.)
  const size_t threads =
      options.make_client ? std::min<size_t>(static_cast<size_t>(std::max(1, options.parallel)), cached.size()) : 1;
  const auto check = [&](RegistryClient& via, size_t first) -> absl::Status {
    for (size_t k = first; k < cached.size(); k += threads) {
      const size_t i = cached[k];
      absl::StatusOr<bool> has = via.HasBlob(repo, report.layers[i].digest);
      if (!has.ok()) return has.status();
      report.layers[i].skipped = *has;
      if (!*has) {
        absl::StatusOr<bool> mounted = MountFromElsewhere(via, ref, report.layers[i].digest, seen_in[i]);
        if (!mounted.ok()) return mounted.status();
        report.layers[i].skipped = report.layers[i].mounted = *mounted;
      }
    }
    return absl::OkStatus();
  };
  if (threads <= 1) {
    RETURN_IF_ERROR(check(client, 0));
  } else {
    std::vector<absl::Status> results(threads);
    std::vector<std::thread> pool;
    for (size_t t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        std::unique_ptr<RegistryClient> own = options.make_client();
        results[t] = check(*own, t);
      });
    }
    for (auto& th : pool) th.join();
    for (const absl::Status& s : results) {
      if (!s.ok()) return s;
    }
  }
  for (size_t i : cached) {
    compress[i] = !report.layers[i].skipped;
    if (report.layers[i].skipped && options.cache != nullptr) {
      options.cache->Put(image->layers[i].diff_id, options.gzip_level,
                         {report.layers[i].digest, report.layers[i].size, here});
    }
  }

  // The others: compressed to scratch files in one pass over the archive,
  // then sent unless the registry has them.
  std::error_code ec;
  const std::string scratch = (std::filesystem::path(options.scratch_dir) /
                               absl::StrCat("kiln-push-", ::getpid(), "-", Sha256Hex(archive).substr(0, 8)))
                                  .string();
  std::filesystem::create_directories(scratch, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", scratch, ": ", ec.message()));
  absl::Cleanup remove_scratch = [&scratch] {
    std::error_code ignored;
    std::filesystem::remove_all(scratch, ignored);
  };
  const auto file_of = [&scratch](size_t i) { return ScratchFile(scratch, i); };
  absl::Mutex progress_mu;
  size_t layers_done = 0;
  uint64_t bytes_done = 0;
  const auto progress = [&](uint64_t bytes) {
    absl::MutexLock lock(&progress_mu);
    ++layers_done;
    bytes_done += bytes;
    if (options.on_layer) options.on_layer(layers_done, bytes_done);
  };
  for (size_t i : cached) {
    if (report.layers[i].skipped) progress(0);
  }
  // A compressed layer: cached, checked with the registry, sent if missing.
  const SendLayer send = [&](size_t i, PushedBlob blob, std::string* held, RegistryClient& via,
                             uint64_t* uploaded) -> absl::Status {
    if (options.cache != nullptr) {
      options.cache->Put(image->layers[i].diff_id, options.gzip_level, {blob.digest, blob.size, here});
    }
    absl::StatusOr<bool> has = via.HasBlob(repo, blob.digest);
    if (!has.ok()) return has.status();
    blob.skipped = *has;
    if (!*has) {
      BlobSource source{.file = held == nullptr ? file_of(i) : "",
                        .data = held == nullptr ? "" : std::move(*held),
                        .size = blob.size};
      RETURN_IF_ERROR(via.UploadBlob(repo, blob.digest, source));
      *uploaded += blob.size;
    }
    std::error_code ignored;
    std::filesystem::remove(file_of(i), ignored);
    report.layers[i] = blob;
    progress(blob.skipped ? 0 : blob.size);
    return absl::OkStatus();
  };
  absl::Status streamed;
  if (options.parallel <= 1 || !options.make_client) {
    // One layer at a time, compressed as it is read.
    std::map<size_t, std::unique_ptr<LayerGzip>> open;
    const auto gz_for = [&](size_t i) -> absl::StatusOr<LayerGzip*> {
      auto& gz = open[i];
      if (!gz) {
        gz = std::make_unique<LayerGzip>();
        RETURN_IF_ERROR(gz->Open(file_of(i), options.gzip_level));
      }
      return gz.get();
    };
    streamed = StreamLayers(
        archive, *image, [&](size_t i) { return compress[i]; },
        [&](size_t i, absl::string_view data) -> absl::Status {
          absl::StatusOr<LayerGzip*> gz = gz_for(i);
          return gz.ok() ? (*gz)->Write(data) : gz.status();
        },
        [&](size_t i) -> absl::Status {
          absl::StatusOr<LayerGzip*> gz = gz_for(i);  // An empty layer has had no chunk.
          if (!gz.ok()) return gz.status();
          absl::StatusOr<PushedBlob> blob = Pushed((*gz)->Finish());
          open.erase(i);
          if (!blob.ok()) return blob.status();
          return send(i, *blob, nullptr, client, &report.bytes_uploaded);
        });
  } else {
    streamed = CompressInParallel(archive, *image, compress, options, scratch, send, report);
  }
  if (!streamed.ok()) return streamed;
  // A layer listed twice is read once: the copies share its blob.
  for (size_t i = 0; i < image->layers.size(); ++i) {
    if (!report.layers[i].digest.empty()) continue;
    for (size_t j = 0; j < i; ++j) {
      if (image->layers[j].path == image->layers[i].path) report.layers[i] = report.layers[j];
    }
  }
  if (options.cache != nullptr) options.cache->Save().IgnoreError();

  RETURN_IF_ERROR(FinishImage(*image, ref, tags, client, options, report));
  return report;
}

absl::StatusOr<PushReport> PushImageStream(int fd, const std::string& what, const ImageRef& ref,
                                           std::vector<std::string> tags, RegistryClient& client,
                                           const PushOptions& options) {
  if (tags.empty() && !ref.tag.empty()) tags.push_back(ref.tag);
  if (tags.empty()) return absl::InvalidArgumentError(absl::StrCat(ref.ToString(), ": no tag to push"));
  const std::string& repo = ref.repository;
  PushReport report;
  report.tags = tags;
  std::map<std::string, PushedBlob> by_path;
  // The stream is read on one thread; its members compress on all.
  std::unique_ptr<GzipMemberPool> pool;
  if (options.parallel > 1) pool = std::make_unique<GzipMemberPool>(options.gzip_level, options.parallel);
  // The layer being read: compressed as it comes, held in memory until it
  // is known to be small, streamed to the registry once it is not.
  struct Layer {
    LayerGzip gz;
    std::string held;
    std::unique_ptr<BlobStream> stream;
  };
  std::unique_ptr<Layer> layer;
  const auto current = [&]() -> absl::StatusOr<Layer*> {
    if (layer) return layer.get();
    layer = std::make_unique<Layer>();
    Layer* l = layer.get();
    absl::Status s = l->gz.OpenSink(
        [&client, &repo, &options, l](absl::string_view piece) -> absl::Status {
          if (l->stream) return l->stream->Append(piece);
          l->held.append(piece.data(), piece.size());
          if (l->held.size() <= options.stream_hold_bytes) return absl::OkStatus();
          absl::StatusOr<std::unique_ptr<BlobStream>> started = client.StartStream(repo);
          if (!started.ok()) return started.status();
          l->stream = *std::move(started);
          absl::Status appended = l->stream->Append(l->held);
          l->held.clear();
          return appended;
        },
        options.gzip_level, pool.get());
    if (!s.ok()) return s;
    return l;
  };
  absl::StatusOr<DockerArchive> image = ReadDockerArchiveStream(
      fd, what,
      [&](const std::string&, absl::string_view data) -> absl::Status {
        absl::StatusOr<Layer*> l = current();
        return l.ok() ? (*l)->gz.Write(data) : l.status();
      },
      [&](const std::string& path) -> absl::Status {
        absl::StatusOr<Layer*> l = current();  // An empty layer has had no chunk.
        if (!l.ok()) return l.status();
        absl::StatusOr<PushedBlob> blob = Pushed((*l)->gz.Finish());
        if (!blob.ok()) return blob.status();
        if ((*l)->stream) {
          RETURN_IF_ERROR((*l)->stream->Finish(blob->digest));
          report.bytes_uploaded += blob->size;
        } else {
          absl::StatusOr<bool> has = client.HasBlob(repo, blob->digest);
          if (!has.ok()) return has.status();
          blob->skipped = *has;
          if (!*has && options.cache != nullptr) {
            absl::StatusOr<bool> mounted =
                MountFromElsewhere(client, ref, blob->digest, options.cache->SeenIn(blob->digest));
            if (!mounted.ok()) return mounted.status();
            blob->skipped = blob->mounted = *mounted;
          }
          if (!blob->skipped) {
            BlobSource source{.file = "", .data = (*l)->held, .size = (*l)->held.size()};
            RETURN_IF_ERROR(client.UploadBlob(repo, blob->digest, source));
            report.bytes_uploaded += blob->size;
          }
        }
        layer.reset();
        by_path[path] = *blob;
        if (options.on_layer) options.on_layer(by_path.size(), report.bytes_uploaded);
        return absl::OkStatus();
      });
  if (!image.ok()) return image.status();
  for (const DockerArchiveLayer& l : image->layers) {
    auto it = by_path.find(l.path);
    if (it == by_path.end()) return absl::InvalidArgumentError(absl::StrCat(what, ": layer ", l.path, " is missing"));
    report.layers.push_back(it->second);
    if (options.cache != nullptr) {
      options.cache->Put(l.diff_id, options.gzip_level,
                         {it->second.digest, it->second.size, absl::StrCat(ref.registry, "/", repo)});
    }
  }
  if (options.cache != nullptr) options.cache->Save().IgnoreError();
  RETURN_IF_ERROR(FinishImage(*image, ref, tags, client, options, report));
  return report;
}

absl::StatusOr<PushReport> PushImage(const std::string& output, const ImageRef& ref, std::vector<std::string> tags,
                                     RegistryClient& client, const PushOptions& options) {
  struct stat st {};
  if (::stat(output.c_str(), &st) != 0) {
    return absl::NotFoundError(absl::StrCat("cannot read ", output, ": ", std::strerror(errno)));
  }
  char magic[2] = {0, 0};
  if (std::FILE* f = std::fopen(output.c_str(), "rb"); f != nullptr) {
    (void)std::fread(magic, 1, 2, f);
    std::fclose(f);
  }
  const bool script = S_ISREG(st.st_mode) && (st.st_mode & S_IXUSR) != 0 && magic[0] == '#' && magic[1] == '!';
  if (!script) return PushDockerArchive(output, ref, std::move(tags), client, options);

  // A streamLayeredImage script: run it (no shell), read its stdout.
  int out[2];
  RETURN_IF_ERROR(MakePipe(out));
  const std::string err_path = absl::StrCat(options.scratch_dir, "/kiln-stream-", ::getpid(), "-", out[0], ".err");
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&actions, out[1], STDOUT_FILENO);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  char* argv[] = {const_cast<char*>(output.c_str()), nullptr};
  pid_t pid = -1;
  const int spawned = ::posix_spawn(&pid, output.c_str(), &actions, nullptr, argv, environ);
  posix_spawn_file_actions_destroy(&actions);
  ::close(out[1]);
  if (spawned != 0) {
    ::close(out[0]);
    return absl::InternalError(absl::StrCat("cannot run ", output, ": ", std::strerror(spawned)));
  }
  absl::StatusOr<PushReport> report = PushImageStream(out[0], output, ref, std::move(tags), client, options);
  ::close(out[0]);
  if (!report.ok()) ::kill(pid, SIGKILL);  // It may be blocked writing to the closed pipe.
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
  std::string err;
  ReadWholeFile(err_path, err).IgnoreError();
  ::unlink(err_path.c_str());
  if (!report.ok()) return report.status();
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    return absl::InternalError(
        absl::StrCat(output, " failed: ", err.substr(err.size() > 2000 ? err.size() - 2000 : 0)));
  }
  return report;
}

}  // namespace kiln
