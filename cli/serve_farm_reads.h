// What the gateway (`kiln serve-nix`) reads from and adds to the farm store,
// shared by its commands and both protocols: store paths as the protocols
// name them, a path's narinfo, a path's NAR as they hand it out
// (uncompressed), and a NAR a client sends.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/farm_store_client.h"
#include "common/narinfo.h"
#include "common/serve_protocol.h"

namespace kiln {

inline constexpr char kServeStoreDir[] = "/nix/store/";

// A full store path (the protocol's form): INVALID_ARGUMENT otherwise.
absl::Status CheckStorePath(const std::string& path);

// A list of full store paths from `in`; INVALID_ARGUMENT at the first that
// is not one.
absl::StatusOr<std::vector<std::string>> ReadStorePaths(ServeReader& in);

// A narinfo names references and the deriver by base name; the protocol by
// full path ("" stays "").
std::string FullStorePath(absl::string_view base);

// The farm's narinfo of `path`; NOT_FOUND when the farm lacks it.
absl::StatusOr<NarInfo> FarmPathInfo(FarmStoreClient& farm, const std::string& path);

// The NAR of `info`'s path, decompressed from the farm's zstd file as it
// arrives, to `out`; DATA_LOSS unless it is exactly the narinfo's NarSize.
absl::Status StreamFarmNar(FarmStoreClient& farm, const NarInfo& info, NarSink out);

// `info`'s NAR — the next nar_size bytes of `in` — into the farm store,
// which checks it as any upload; a path the farm holds already is read past.
absl::Status AddFarmPathFrom(FarmStoreClient& farm, const kiln::v1::PathInfo& info, ServeReader& in);

// The NAR of `path` held whole in memory; RESOURCE_EXHAUSTED over
// `max_bytes` (for small paths: .drv files).
absl::StatusOr<std::string> SmallFarmNar(FarmStoreClient& farm, const std::string& path, uint64_t max_bytes);

}  // namespace kiln
