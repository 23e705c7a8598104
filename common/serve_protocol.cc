#include "common/serve_protocol.h"

#include <cstring>

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

}  // namespace kiln
