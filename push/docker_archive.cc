#include "push/docker_archive.h"

#include <archive.h>
#include <archive_entry.h>

#include <map>
#include <memory>

#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "common/status_macros.h"

namespace kiln {
namespace {

// JSON members of an image archive are small; anything larger is not one.
constexpr int64_t kMaxJsonBytes = 16 << 20;
constexpr size_t kBlock = 1 << 20;

struct ArchiveCloser {
  void operator()(archive* a) const { archive_read_free(a); }
};
using ArchivePtr = std::unique_ptr<archive, ArchiveCloser>;

// A reader of tar, plain or gzip-compressed.
ArchivePtr NewReader() {
  ArchivePtr a(archive_read_new());
  archive_read_support_filter_gzip(a.get());
  archive_read_support_filter_none(a.get());
  archive_read_support_format_tar(a.get());
  return a;
}

// `block`: the size of each read. Large for layers; small when only the
// JSON members are wanted, as each member skipped still costs one read.
absl::StatusOr<ArchivePtr> OpenArchive(const std::string& path, size_t block = kBlock) {
  ArchivePtr a = NewReader();
  if (archive_read_open_filename(a.get(), path.c_str(), block) != ARCHIVE_OK) {
    return absl::InvalidArgumentError(absl::StrCat("cannot read ", path, ": ", archive_error_string(a.get())));
  }
  return a;
}

// libarchive's name of a member, without a leading "./".
std::string Normalise(absl::string_view name) {
  absl::ConsumePrefix(&name, "./");
  return std::string(name);
}

absl::Status Broken(const std::string& path, archive* a) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": ", archive_error_string(a)));
}

// The image described by an archive's JSON members (name -> content).
absl::StatusOr<DockerArchive> DockerArchiveFromJson(const std::map<std::string, std::string>& json_files,
                                                    const std::string& path) {
  auto manifest_it = json_files.find("manifest.json");
  if (manifest_it == json_files.end()) {
    return absl::InvalidArgumentError(absl::StrCat(path, " is not a docker-archive: it has no manifest.json"));
  }
  nlohmann::json manifest = nlohmann::json::parse(manifest_it->second, nullptr, false);
  if (!manifest.is_array() || manifest.size() != 1 || !manifest[0].is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": manifest.json must describe exactly one image"));
  }
  const nlohmann::json& m = manifest[0];
  DockerArchive image;
  if (!m.contains("Config") || !m["Config"].is_string() || !m.contains("Layers") || !m["Layers"].is_array()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": manifest.json lacks Config or Layers"));
  }
  image.config_path = Normalise(m["Config"].get<std::string>());
  auto config_it = json_files.find(image.config_path);
  if (config_it == json_files.end()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": the config ", image.config_path, " is missing"));
  }
  image.config = config_it->second;
  if (m.contains("RepoTags") && m["RepoTags"].is_array()) {
    for (const auto& t : m["RepoTags"]) {
      if (t.is_string()) image.repo_tags.push_back(t.get<std::string>());
    }
  }
  nlohmann::json config = nlohmann::json::parse(image.config, nullptr, false);
  const nlohmann::json* diff_ids = nullptr;
  if (config.is_object() && config.contains("rootfs") && config["rootfs"].is_object() &&
      config["rootfs"].contains("diff_ids") && config["rootfs"]["diff_ids"].is_array()) {
    diff_ids = &config["rootfs"]["diff_ids"];
  }
  if (diff_ids == nullptr || diff_ids->size() != m["Layers"].size()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": the config's rootfs.diff_ids do not match the manifest's Layers"));
  }
  for (size_t i = 0; i < m["Layers"].size(); ++i) {
    if (!m["Layers"][i].is_string() || !(*diff_ids)[i].is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": layer ", i, " is not named"));
    }
    image.layers.push_back({Normalise(m["Layers"][i].get<std::string>()), (*diff_ids)[i].get<std::string>()});
  }
  return image;
}

// Where the bytes of layers go while the members are read.
struct LayerSink {
  absl::FunctionRef<absl::Status(const std::string& path, absl::string_view data)> chunk;
  absl::FunctionRef<absl::Status(const std::string& path)> done;
};

// Every member of the archive in one pass: the JSON ones kept and parsed
// into the image at the end, the others (layers) given to `layers`, or
// skipped without being read when there is none.
absl::StatusOr<DockerArchive> ReadMembers(archive* a, const std::string& what, const LayerSink* layers) {
  std::map<std::string, std::string> json_files;
  std::string buffer(layers != nullptr ? kBlock : 0, '\0');
  archive_entry* entry = nullptr;
  int r;
  while ((r = archive_read_next_header(a, &entry)) == ARCHIVE_OK) {
    if (archive_entry_filetype(entry) != AE_IFREG) continue;
    const std::string name = Normalise(archive_entry_pathname(entry));
    if (absl::EndsWith(name, ".json")) {
      if (archive_entry_size(entry) > kMaxJsonBytes) {
        return absl::InvalidArgumentError(absl::StrCat(what, ": ", name, " is too large for image metadata"));
      }
      std::string data(static_cast<size_t>(archive_entry_size(entry)), '\0');
      if (archive_read_data(a, data.data(), data.size()) != static_cast<la_ssize_t>(data.size())) {
        return Broken(what, a);
      }
      json_files[name] = std::move(data);
      continue;
    }
    if (layers == nullptr) continue;
    for (la_ssize_t n; (n = archive_read_data(a, buffer.data(), buffer.size())) != 0;) {
      if (n < 0) return Broken(what, a);
      if (absl::Status s = layers->chunk(name, absl::string_view(buffer.data(), static_cast<size_t>(n))); !s.ok()) {
        return s;
      }
    }
    RETURN_IF_ERROR(layers->done(name));
  }
  if (r != ARCHIVE_EOF) return Broken(what, a);
  return DockerArchiveFromJson(json_files, what);
}

}  // namespace

absl::StatusOr<DockerArchive> ReadDockerArchive(const std::string& path) {
  absl::StatusOr<ArchivePtr> a = OpenArchive(path, 16 << 10);
  if (!a.ok()) return a.status();
  return ReadMembers(a->get(), path, nullptr);
}

absl::StatusOr<DockerArchive> ReadDockerArchiveStream(
    int fd, const std::string& what,
    absl::FunctionRef<absl::Status(const std::string& path, absl::string_view data)> chunk,
    absl::FunctionRef<absl::Status(const std::string& path)> done) {
  ArchivePtr a = NewReader();
  if (archive_read_open_fd(a.get(), fd, kBlock) != ARCHIVE_OK) {
    return absl::InvalidArgumentError(absl::StrCat("cannot read ", what, ": ", archive_error_string(a.get())));
  }
  const LayerSink sink{chunk, done};
  return ReadMembers(a.get(), what, &sink);
}

absl::Status StreamLayers(const std::string& path, const DockerArchive& image,
                          absl::FunctionRef<bool(size_t index)> wanted,
                          absl::FunctionRef<absl::Status(size_t index, absl::string_view data)> chunk,
                          absl::FunctionRef<absl::Status(size_t index)> done) {
  std::map<std::string, size_t> index_of;
  for (size_t i = 0; i < image.layers.size(); ++i) {
    if (wanted(i)) index_of.emplace(image.layers[i].path, i);
  }
  if (index_of.empty()) return absl::OkStatus();
  absl::StatusOr<ArchivePtr> a = OpenArchive(path);
  if (!a.ok()) return a.status();
  std::string buffer(kBlock, '\0');
  archive_entry* entry = nullptr;
  int r = ARCHIVE_OK;
  while (!index_of.empty() && (r = archive_read_next_header(a->get(), &entry)) == ARCHIVE_OK) {
    auto it = index_of.find(Normalise(archive_entry_pathname(entry)));
    if (it == index_of.end()) continue;
    const size_t index = it->second;
    index_of.erase(it);
    for (;;) {
      const la_ssize_t n = archive_read_data(a->get(), buffer.data(), buffer.size());
      if (n < 0) return Broken(path, a->get());
      if (n == 0) break;
      RETURN_IF_ERROR(chunk(index, absl::string_view(buffer.data(), static_cast<size_t>(n))));
    }
    RETURN_IF_ERROR(done(index));
  }
  if (!index_of.empty() && r != ARCHIVE_EOF) return Broken(path, a->get());
  if (!index_of.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": layer ", index_of.begin()->first, " is missing"));
  }
  return absl::OkStatus();
}

}  // namespace kiln
