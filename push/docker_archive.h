// Reading a docker-archive (what `dockerTools.buildLayeredImage` and
// `docker save` write): a tar, possibly gzip-compressed, holding
// manifest.json (Config, RepoTags, Layers), the config JSON (whose
// rootfs.diff_ids are the layers' uncompressed digests) and one
// uncompressed tar per layer. Read with libarchive, one sequential pass at a
// time: a .tar.gz cannot be read any other way.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kiln {

struct DockerArchiveLayer {
  std::string path;     // Inside the archive, without a leading "./".
  std::string diff_id;  // "sha256:<hex>" of the uncompressed layer tar.
};

struct DockerArchive {
  std::string config;       // The config JSON, as stored.
  std::string config_path;
  std::vector<DockerArchiveLayer> layers;  // Bottom layer first.
  std::vector<std::string> repo_tags;
};

// Reads manifest.json and the config (one pass over the archive).
absl::StatusOr<DockerArchive> ReadDockerArchive(const std::string& path);

// The image described by an archive's JSON members (name -> content, names
// without "./"); `what` names the archive in errors.
absl::StatusOr<DockerArchive> DockerArchiveFromJson(const std::map<std::string, std::string>& json_files,
                                                    const std::string& what);

// libarchive's name of an entry, without a leading "./".
std::string NormaliseArchivePath(absl::string_view name);

// One more pass, calling `chunk(index, data)` with the bytes of each layer
// whose index `wanted(index)` says, in archive order, then
// `done(index)` after its last chunk. A layer listed twice by the manifest
// is read once, for its first index.
absl::Status StreamLayers(const std::string& path, const DockerArchive& image,
                          absl::FunctionRef<bool(size_t index)> wanted,
                          absl::FunctionRef<absl::Status(size_t index, absl::string_view data)> chunk,
                          absl::FunctionRef<absl::Status(size_t index)> done);

}  // namespace kiln
