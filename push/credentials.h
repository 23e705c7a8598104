// Registry credentials from a docker-style config.json ("auths" →
// registry → "auth" (base64 of user:password) or "username"/"password"), as
// `docker login`, `skopeo login` and `podman login` write it. The secrets
// stay in the returned struct: no error message ever quotes them.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "push/registry_client.h"

namespace kiln {

// The credentials for `registry` (host[:port]); empty ones when the file has
// none for it.
absl::StatusOr<RegistryCredentials> LoadDockerCredentials(const std::string& path, const std::string& registry);

}  // namespace kiln
