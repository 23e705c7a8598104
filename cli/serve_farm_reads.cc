#include "cli/serve_farm_reads.h"

#include <zstd.h>

#include <algorithm>
#include <memory>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace kiln {
namespace {

struct ZstdDFree {
  void operator()(ZSTD_DCtx* d) const { ZSTD_freeDCtx(d); }
};

}  // namespace

absl::Status CheckStorePath(const std::string& path) {
  if (!absl::StartsWith(path, kServeStoreDir)) {
    return absl::InvalidArgumentError(absl::StrCat("not a store path: ", path));
  }
  return StorePathHashPart(path).status();
}

absl::StatusOr<std::vector<std::string>> ReadStorePaths(ServeReader& in) {
  ASSIGN_OR_RETURN(std::vector<std::string> paths, in.Strings());
  for (const std::string& p : paths) RETURN_IF_ERROR(CheckStorePath(p));
  return paths;
}

std::string FullStorePath(absl::string_view base) {
  return base.empty() ? std::string() : absl::StrCat(kServeStoreDir, base);
}

absl::StatusOr<NarInfo> FarmPathInfo(FarmStoreClient& farm, const std::string& path) {
  RETURN_IF_ERROR(CheckStorePath(path));
  ASSIGN_OR_RETURN(std::string hash_part, StorePathHashPart(path));
  ASSIGN_OR_RETURN(std::string text, farm.NarInfo(hash_part));
  ASSIGN_OR_RETURN(NarInfo info, ParseNarInfo(text));
  if (info.store_path != path) return absl::NotFoundError(absl::StrCat(path, " is not in the farm store"));
  return info;
}

absl::Status StreamFarmNar(FarmStoreClient& farm, const NarInfo& info, NarSink out) {
  if (info.compression != "zstd" || !absl::StartsWith(info.url, "nar/")) {
    return absl::InternalError(absl::StrCat("the farm's NAR of ", info.store_path, " is not zstd"));
  }
  std::unique_ptr<ZSTD_DCtx, ZstdDFree> zstd(ZSTD_createDCtx());
  std::string buf(ZSTD_DStreamOutSize(), '\0');
  uint64_t sent = 0;
  size_t last = 1;
  RETURN_IF_ERROR(farm.FetchNar(info.url.substr(4), [&](absl::string_view piece) -> absl::Status {
    ZSTD_inBuffer input{piece.data(), piece.size(), 0};
    while (input.pos < input.size) {
      ZSTD_outBuffer output{buf.data(), buf.size(), 0};
      last = ZSTD_decompressStream(zstd.get(), &output, &input);
      if (ZSTD_isError(last)) return absl::DataLossError(absl::StrCat("zstd: ", ZSTD_getErrorName(last)));
      sent += output.pos;
      if (sent > info.nar_size) {
        return absl::DataLossError(absl::StrCat("the NAR of ", info.store_path, " is too long"));
      }
      RETURN_IF_ERROR(out(absl::string_view(buf.data(), output.pos)));
    }
    return absl::OkStatus();
  }));
  if (last != 0 || sent != info.nar_size) {
    return absl::DataLossError(
        absl::StrCat("the NAR of ", info.store_path, " is ", sent, " bytes, not ", info.nar_size));
  }
  return absl::OkStatus();
}

absl::Status AddFarmPathFrom(FarmStoreClient& farm, const kiln::v1::PathInfo& info, ServeReader& in) {
  uint64_t left = info.nar_size();
  std::string buf(size_t{256} << 10, '\0');
  const auto next = [&]() -> absl::StatusOr<absl::string_view> {
    ASSIGN_OR_RETURN(size_t n, in.Some(buf.data(), static_cast<size_t>(std::min<uint64_t>(left, buf.size()))));
    left -= n;
    return absl::string_view(buf.data(), n);
  };
  RETURN_IF_ERROR_CONTEXT(farm.AddPath(info,
                                       [&](NarSink sink) -> absl::Status {
                                         while (left > 0) {
                                           ASSIGN_OR_RETURN(absl::string_view piece, next());
                                           RETURN_IF_ERROR(sink(piece));
                                         }
                                         return absl::OkStatus();
                                       }),
                          "adding ", info.store_path(), " to the farm store");
  // The farm held it already and read none of it: the rest is the
  // client's, still to be read past.
  while (left > 0) RETURN_IF_ERROR(next().status());
  return absl::OkStatus();
}

absl::StatusOr<std::string> SmallFarmNar(FarmStoreClient& farm, const std::string& path, uint64_t max_bytes) {
  ASSIGN_OR_RETURN(NarInfo info, FarmPathInfo(farm, path));
  if (info.nar_size > max_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the NAR of ", path, " is ", info.nar_size, " bytes (at most ", max_bytes, " are read)"));
  }
  std::string nar;
  RETURN_IF_ERROR(StreamFarmNar(farm, info, [&](absl::string_view piece) {
    nar.append(piece.data(), piece.size());
    return absl::OkStatus();
  }));
  return nar;
}

}  // namespace kiln
