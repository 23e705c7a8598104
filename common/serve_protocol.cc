#include "common/serve_protocol.h"

#include <cstring>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace kiln {
namespace {

constexpr size_t kBufferBytes = size_t{64} << 10;

size_t Padding(size_t n) { return (8 - n % 8) % 8; }

}  // namespace

ServeReader::ServeReader(Source source, ServeLimits limits)
    : source_(std::move(source)), limits_(limits), buffer_(kBufferBytes, '\0') {}

absl::Status ServeReader::Fill() {
  if (begin_ < end_) return absl::OkStatus();
  ASSIGN_OR_RETURN(size_t n, source_(buffer_.data(), buffer_.size()));
  begin_ = 0;
  end_ = std::min(n, buffer_.size());
  return absl::OkStatus();
}

absl::StatusOr<size_t> ServeReader::Some(char* buf, size_t n) {
  RETURN_IF_ERROR(Fill());
  if (begin_ == end_) return absl::DataLossError("the input ended in the middle of a message");
  const size_t take = std::min(n, end_ - begin_);
  std::memcpy(buf, buffer_.data() + begin_, take);
  begin_ += take;
  return take;
}

absl::Status ServeReader::Raw(char* buf, size_t n) {
  while (n > 0) {
    ASSIGN_OR_RETURN(size_t got, Some(buf, n));
    buf += got;
    n -= got;
  }
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> ServeReader::U64() {
  RETURN_IF_ERROR(Fill());
  if (begin_ == end_) return absl::OutOfRangeError("the input ended");
  unsigned char bytes[8];
  RETURN_IF_ERROR(Raw(reinterpret_cast<char*>(bytes), 8));
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | bytes[i];
  return v;
}

absl::StatusOr<std::string> ServeReader::String() {
  absl::StatusOr<uint64_t> size = U64();
  if (absl::IsOutOfRange(size.status())) return absl::DataLossError("the input ended before a string");
  RETURN_IF_ERROR(size.status());
  if (*size > limits_.max_string_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("a string of ", *size, " bytes (at most ", limits_.max_string_bytes, ")"));
  }
  std::string s(static_cast<size_t>(*size), '\0');
  RETURN_IF_ERROR(Raw(s.data(), s.size()));
  char pad[8];
  const size_t padding = Padding(s.size());
  RETURN_IF_ERROR(Raw(pad, padding));
  for (size_t i = 0; i < padding; ++i) {
    if (pad[i] != 0) return absl::DataLossError("a string's padding is not zero");
  }
  return s;
}

absl::StatusOr<std::vector<std::string>> ServeReader::Strings() {
  absl::StatusOr<uint64_t> count = U64();
  if (absl::IsOutOfRange(count.status())) return absl::DataLossError("the input ended before a list");
  RETURN_IF_ERROR(count.status());
  if (*count > limits_.max_list_items) {
    return absl::ResourceExhaustedError(
        absl::StrCat("a list of ", *count, " items (at most ", limits_.max_list_items, ")"));
  }
  std::vector<std::string> list;
  list.reserve(static_cast<size_t>(std::min<uint64_t>(*count, 1024)));
  for (uint64_t i = 0; i < *count; ++i) {
    ASSIGN_OR_RETURN(std::string s, String());
    list.push_back(std::move(s));
  }
  return list;
}

ServeWriter& ServeWriter::U64(uint64_t v) {
  for (int i = 0; i < 8; ++i) data_.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  return *this;
}

ServeWriter& ServeWriter::String(absl::string_view s) {
  U64(s.size());
  data_.append(s.data(), s.size());
  data_.append(Padding(s.size()), '\0');
  return *this;
}

ServeWriter& ServeWriter::Strings(const std::vector<std::string>& list) {
  U64(list.size());
  for (const std::string& s : list) String(s);
  return *this;
}

ServeWriter& ServeWriter::Raw(absl::string_view bytes) {
  data_.append(bytes.data(), bytes.size());
  return *this;
}

absl::StatusOr<ServeDerivation> ReadServeDerivation(ServeReader& in) {
  ServeDerivation drv;
  ASSIGN_OR_RETURN(uint64_t outputs, in.U64());
  if (outputs == 0 || outputs > 256) {
    return absl::InvalidArgumentError(absl::StrCat("a derivation with ", outputs, " outputs"));
  }
  for (uint64_t i = 0; i < outputs; ++i) {
    ServeDerivationOutput& o = drv.outputs.emplace_back();
    ASSIGN_OR_RETURN(o.name, in.String());
    ASSIGN_OR_RETURN(o.path, in.String());
    ASSIGN_OR_RETURN(o.hash_algo, in.String());
    ASSIGN_OR_RETURN(o.hash, in.String());
  }
  ASSIGN_OR_RETURN(drv.input_srcs, in.Strings());
  ASSIGN_OR_RETURN(drv.platform, in.String());
  ASSIGN_OR_RETURN(drv.builder, in.String());
  ASSIGN_OR_RETURN(drv.args, in.Strings());
  ASSIGN_OR_RETURN(uint64_t env, in.U64());
  if (env > (uint64_t{1} << 16))
    return absl::ResourceExhaustedError(absl::StrCat("a derivation with ", env, " variables"));
  for (uint64_t i = 0; i < env; ++i) {
    ASSIGN_OR_RETURN(std::string key, in.String());
    ASSIGN_OR_RETURN(std::string value, in.String());
    drv.env.emplace_back(std::move(key), std::move(value));
  }
  return drv;
}

absl::StatusOr<ServeDerivation> DecodeServeDerivation(absl::string_view bytes) {
  size_t at = 0;
  ServeReader reader([&](char* buf, size_t size) -> absl::StatusOr<size_t> {
    const size_t n = std::min(size, bytes.size() - at);
    std::memcpy(buf, bytes.data() + at, n);
    at += n;
    return n;
  });
  ASSIGN_OR_RETURN(ServeDerivation drv, ReadServeDerivation(reader));
  // The reader buffers: what it holds unread is past the derivation too.
  if (!absl::IsOutOfRange(reader.U64().status())) return absl::InvalidArgumentError("trailing bytes");
  return drv;
}

Derivation ToDerivation(const ServeDerivation& drv) {
  Derivation d;
  for (const ServeDerivationOutput& o : drv.outputs) d.outputs[o.name] = {o.path, o.hash_algo, o.hash};
  d.input_srcs = drv.input_srcs;
  d.system = drv.platform;
  d.builder = drv.builder;
  d.args = drv.args;
  for (const auto& [key, value] : drv.env) d.env[key] = value;
  return d;
}

ServeDerivation ToServeDerivation(const Derivation& resolved) {
  ServeDerivation d;
  for (const auto& [name, o] : resolved.outputs) d.outputs.push_back({name, o.path, o.hash_algo, o.hash});
  d.input_srcs = resolved.input_srcs;
  d.platform = resolved.system;
  d.builder = resolved.builder;
  d.args = resolved.args;
  d.env.assign(resolved.env.begin(), resolved.env.end());
  return d;
}

void WriteServeDerivation(ServeWriter& out, const ServeDerivation& drv) {
  out.U64(drv.outputs.size());
  for (const ServeDerivationOutput& o : drv.outputs)
    out.String(o.name).String(o.path).String(o.hash_algo).String(o.hash);
  out.Strings(drv.input_srcs).String(drv.platform).String(drv.builder).Strings(drv.args);
  out.U64(drv.env.size());
  for (const auto& [key, value] : drv.env) out.String(key).String(value);
}

absl::StatusOr<ServeBuildOptions> ReadServeBuildOptions(ServeReader& in, uint64_t version) {
  ServeBuildOptions o;
  ASSIGN_OR_RETURN(o.max_silent_time, in.U64());
  ASSIGN_OR_RETURN(o.build_timeout, in.U64());
  if (ServeMinor(version) >= 2) {
    ASSIGN_OR_RETURN(o.max_log_size, in.U64());
  }
  if (ServeMinor(version) >= 3) {
    ASSIGN_OR_RETURN(o.build_repeat, in.U64());
    ASSIGN_OR_RETURN(uint64_t enforce, in.U64());
    o.enforce_determinism = enforce != 0;
  }
  if (ServeMinor(version) >= 7) {
    ASSIGN_OR_RETURN(uint64_t keep, in.U64());
    o.keep_failed = keep != 0;
  }
  return o;
}

void WriteServeBuildOptions(ServeWriter& out, const ServeBuildOptions& o, uint64_t version) {
  out.U64(o.max_silent_time).U64(o.build_timeout);
  if (ServeMinor(version) >= 2) out.U64(o.max_log_size);
  if (ServeMinor(version) >= 3) out.U64(o.build_repeat).U64(o.enforce_determinism ? 1 : 0);
  if (ServeMinor(version) >= 7) out.U64(o.keep_failed ? 1 : 0);
}

std::vector<std::pair<std::string, std::string>> ServeBuiltOutputs(
    const std::vector<std::pair<std::string, std::string>>& outputs) {
  std::vector<std::pair<std::string, std::string>> built;
  for (const auto& [name, path] : outputs) {
    const std::string id = absl::StrCat("sha256:", std::string(64, '0'), "!", name);
    const size_t slash = path.rfind('/');
    nlohmann::json realisation = {{"id", id}, {"outPath", slash == std::string::npos ? path : path.substr(slash + 1)}};
    built.emplace_back(id, realisation.dump());
  }
  return built;
}

absl::StatusOr<ServeBuildResult> ReadServeBuildResult(ServeReader& in, uint64_t version) {
  ServeBuildResult r;
  ASSIGN_OR_RETURN(uint64_t status, in.U64());
  if (status > static_cast<uint64_t>(ServeBuildStatus::kNoSubstituters)) {
    return absl::InvalidArgumentError(absl::StrCat("unknown build status ", status));
  }
  r.status = static_cast<ServeBuildStatus>(status);
  ASSIGN_OR_RETURN(r.error_msg, in.String());
  if (ServeMinor(version) >= 3) {
    ASSIGN_OR_RETURN(r.times_built, in.U64());
    ASSIGN_OR_RETURN(uint64_t nondeterministic, in.U64());
    r.non_deterministic = nondeterministic != 0;
    ASSIGN_OR_RETURN(r.start_time, in.U64());
    ASSIGN_OR_RETURN(r.stop_time, in.U64());
  }
  if (ServeMinor(version) >= 6) {
    ASSIGN_OR_RETURN(uint64_t n, in.U64());
    if (n > 256) return absl::ResourceExhaustedError(absl::StrCat(n, " built outputs"));
    for (uint64_t i = 0; i < n; ++i) {
      ASSIGN_OR_RETURN(std::string id, in.String());
      ASSIGN_OR_RETURN(std::string realisation, in.String());
      r.built_outputs.emplace_back(std::move(id), std::move(realisation));
    }
  }
  return r;
}

void WriteServeBuildResult(ServeWriter& out, const ServeBuildResult& r, uint64_t version) {
  out.U64(static_cast<uint64_t>(r.status)).String(r.error_msg);
  if (ServeMinor(version) >= 3) {
    out.U64(r.times_built).U64(r.non_deterministic ? 1 : 0).U64(r.start_time).U64(r.stop_time);
  }
  if (ServeMinor(version) >= 6) {
    out.U64(r.built_outputs.size());
    for (const auto& [id, realisation] : r.built_outputs) out.String(id).String(realisation);
  }
}

}  // namespace kiln
