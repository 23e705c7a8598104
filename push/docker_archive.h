// Reading a docker-archive (what `dockerTools.buildLayeredImage` and
// `docker save` write): a tar, possibly gzip-compressed, holding
// manifest.json (Config, RepoTags, Layers), the config JSON (whose
// rootfs.diff_ids are the layers' uncompressed digests) and one
// uncompressed tar per layer. Read with libarchive, one sequential pass at a
// time: a .tar.gz cannot be read any other way.
#pragma once

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
  std::string config;  // The config JSON, as stored.
  std::string config_path;
  std::vector<DockerArchiveLayer> layers;  // Bottom layer first.
  std::vector<std::string> repo_tags;
};

// Reads manifest.json and the config (one pass over the archive).
absl::StatusOr<DockerArchive> ReadDockerArchive(const std::string& path);

// One pass over an archive read from `fd` (a pipe will do): the bytes of
// every member that is not JSON (a layer) go to `chunk(path, data)` as they
// come, then `done(path)`; manifest.json and the config are parsed at the
// end. `what` names the source in errors.
absl::StatusOr<DockerArchive> ReadDockerArchiveStream(
    int fd, const std::string& what,
    absl::FunctionRef<absl::Status(const std::string& path, absl::string_view data)> chunk,
    absl::FunctionRef<absl::Status(const std::string& path)> done);

// One more pass, calling `chunk(index, data)` with the bytes of each layer
// whose index `wanted(index)` says, in archive order, then
// `done(index)` after its last chunk. A layer listed twice by the manifest
// is read once, for its first index.
absl::Status StreamLayers(const std::string& path, const DockerArchive& image,
                          absl::FunctionRef<bool(size_t index)> wanted,
                          absl::FunctionRef<absl::Status(size_t index, absl::string_view data)> chunk,
                          absl::FunctionRef<absl::Status(size_t index)> done);

}  // namespace kiln
