// Finished jobs' logs as the coordinator stores them: a StoredLog message,
// zlib-compressed with libdeflate (build logs shrink 5-10x). The encoding
// is versioned by its first byte so a later format can sit beside it.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kiln/state/v1/records.pb.h"

namespace kiln {

std::string EncodeStoredLog(const kiln::state::v1::StoredLog& log);
// DataLoss on anything EncodeStoredLog did not produce (or a larger log than
// `max_bytes` uncompressed).
absl::StatusOr<kiln::state::v1::StoredLog> DecodeStoredLog(absl::string_view bytes,
                                                           size_t max_bytes = size_t{256} << 20);

}  // namespace kiln
