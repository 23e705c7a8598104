#include "common/nar.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "common/digest.h"
#include "common/status_macros.h"

namespace kiln {
namespace {

constexpr size_t kBufferBytes = 64 << 10;
constexpr size_t kMaxTokenBytes = 64;  // "nix-archive-1", "executable", … are short.

class NarParser {
 public:
  // `prefix`: the archive starts a stream that goes on after it; no byte
  // past its end is read. `root_file`: where the contents of a root that is
  // a regular file go (at most `max_root_file` bytes).
  NarParser(NarSource source, const NarLimits& limits, bool prefix = false, std::string* root_file = nullptr,
            uint64_t max_root_file = 0)
      : source_(source),
        limits_(limits),
        prefix_(prefix),
        root_file_(root_file),
        max_root_file_(max_root_file),
        buffer_(kBufferBytes) {}

  absl::StatusOr<NarSummary> Parse() {
    RETURN_IF_ERROR(Expect("nix-archive-1", "/", "not a NAR (no nix-archive-1 header)"));
    RETURN_IF_ERROR(Node("/", 0));
    // Exactly one archive: nothing may follow it.
    if (!prefix_) RETURN_IF_ERROR(Fill(kBufferBytes));
    if (!prefix_ && begin_ < end_) return Malformed("/", "bytes after the end of the archive");
    summary_.nar_bytes = consumed_;
    summary_.sha256 = absl::HexStringToBytes(hash_.FinishHex());
    return summary_;
  }

 private:
  static absl::Status Malformed(absl::string_view path, absl::string_view what) {
    return absl::DataLossError(absl::StrCat("malformed NAR at ", path, ": ", what));
  }

  // Makes bytes available in the buffer (up to `want` of them when the
  // archive is a stream's prefix); none at the end of the source.
  absl::Status Fill(uint64_t want) {
    if (begin_ < end_) return absl::OkStatus();
    begin_ = end_ = 0;
    const size_t ask = prefix_ ? static_cast<size_t>(std::min<uint64_t>(want, buffer_.size())) : buffer_.size();
    ASSIGN_OR_RETURN(size_t n, source_(buffer_.data(), ask));
    end_ = std::min(n, buffer_.size());
    return absl::OkStatus();
  }

  // Consumes `n` bytes, copying them to `out` when given.
  absl::Status Take(uint64_t n, std::string* out, absl::string_view path) {
    if (consumed_ + n > limits_.max_nar_bytes || consumed_ + n < consumed_) {
      return absl::ResourceExhaustedError(
          absl::StrCat("NAR larger than the limit of ", limits_.max_nar_bytes, " bytes (at ", path, ")"));
    }
    while (n > 0) {
      RETURN_IF_ERROR(Fill(n));
      if (begin_ == end_) return Malformed(path, "truncated");
      const size_t step = static_cast<size_t>(std::min<uint64_t>(n, end_ - begin_));
      const absl::string_view piece(buffer_.data() + begin_, step);
      hash_.Update(piece);
      if (out != nullptr) out->append(piece.data(), piece.size());
      begin_ += step;
      consumed_ += step;
      n -= step;
    }
    return absl::OkStatus();
  }

  absl::StatusOr<uint64_t> U64(absl::string_view path) {
    std::string bytes;
    RETURN_IF_ERROR(Take(8, &bytes, path));
    uint64_t v = 0;
    for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(bytes[static_cast<size_t>(i)]);
    return v;
  }

  // The zero padding after `length` bytes of a string.
  absl::Status Padding(uint64_t length, absl::string_view path) {
    const uint64_t pad = (8 - length % 8) % 8;
    if (pad == 0) return absl::OkStatus();
    std::string bytes;
    RETURN_IF_ERROR(Take(pad, &bytes, path));
    if (bytes.find_first_not_of('\0') != std::string::npos) return Malformed(path, "non-zero padding");
    return absl::OkStatus();
  }

  // A string of at most `max` bytes.
  absl::StatusOr<std::string> String(size_t max, absl::string_view path, absl::string_view what) {
    ASSIGN_OR_RETURN(uint64_t length, U64(path));
    if (length > max) return Malformed(path, absl::StrCat(what, " of ", length, " bytes (at most ", max, ")"));
    std::string s;
    RETURN_IF_ERROR(Take(length, &s, path));
    RETURN_IF_ERROR(Padding(length, path));
    return s;
  }

  absl::Status Expect(absl::string_view token, absl::string_view path, absl::string_view what = "") {
    ASSIGN_OR_RETURN(std::string got, String(kMaxTokenBytes, path, "a token"));
    if (got != token) {
      return Malformed(path, what.empty() ? absl::StrCat("expected '", token, "', got '", absl::CHexEscape(got), "'")
                                          : std::string(what));
    }
    return absl::OkStatus();
  }

  absl::Status CountEntry(absl::string_view path) {
    if (++entries_ > limits_.max_entries) {
      return absl::ResourceExhaustedError(
          absl::StrCat("NAR with more than ", limits_.max_entries, " entries (at ", path, ")"));
    }
    return absl::OkStatus();
  }

  absl::Status Node(const std::string& path, size_t depth) {
    RETURN_IF_ERROR(CountEntry(path));
    RETURN_IF_ERROR(Expect("(", path));
    RETURN_IF_ERROR(Expect("type", path));
    ASSIGN_OR_RETURN(std::string type, String(kMaxTokenBytes, path, "a type"));
    if (type == "regular") {
      ASSIGN_OR_RETURN(std::string tag, String(kMaxTokenBytes, path, "a token"));
      if (tag == "executable") {
        RETURN_IF_ERROR(Expect("", path));
        ++summary_.executables;
        ASSIGN_OR_RETURN(tag, String(kMaxTokenBytes, path, "a token"));
      }
      if (tag != "contents")
        return Malformed(path, absl::StrCat("expected 'contents', got '", absl::CHexEscape(tag), "'"));
      ASSIGN_OR_RETURN(uint64_t length, U64(path));
      std::string* keep = depth == 0 ? root_file_ : nullptr;
      if (keep != nullptr && length > max_root_file_) {
        return absl::ResourceExhaustedError(
            absl::StrCat("a file of ", length, " bytes (at most ", max_root_file_, " are read)"));
      }
      RETURN_IF_ERROR(Take(length, keep, path));
      RETURN_IF_ERROR(Padding(length, path));
      ++summary_.regular_files;
      summary_.content_bytes += length;
    } else if (type == "symlink") {
      RETURN_IF_ERROR(Expect("target", path));
      ASSIGN_OR_RETURN(std::string target, String(limits_.max_target_bytes, path, "a symlink target"));
      if (target.empty() || target.find('\0') != std::string::npos) {
        return Malformed(path, "a symlink target that is empty or holds NUL");
      }
      ++summary_.symlinks;
    } else if (type == "directory") {
      if (depth >= limits_.max_depth)
        return Malformed(path, absl::StrCat("deeper than ", limits_.max_depth, " directories"));
      ++summary_.directories;
      std::string previous;
      bool first = true;
      for (;;) {
        ASSIGN_OR_RETURN(std::string tag, String(kMaxTokenBytes, path, "a token"));
        if (tag == ")") return absl::OkStatus();
        if (tag != "entry")
          return Malformed(path, absl::StrCat("expected 'entry' or ')', got '", absl::CHexEscape(tag), "'"));
        RETURN_IF_ERROR(Expect("(", path));
        RETURN_IF_ERROR(Expect("name", path));
        ASSIGN_OR_RETURN(std::string name, String(limits_.max_name_bytes, path, "a name"));
        if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos ||
            name.find('\0') != std::string::npos) {
          return Malformed(path, absl::StrCat("an entry named '", absl::CHexEscape(name), "'"));
        }
        if (!first && name <= previous) {
          return Malformed(path, absl::StrCat("entries not in order ('", absl::CHexEscape(name), "' after '",
                                              absl::CHexEscape(previous), "')"));
        }
        const std::string child = path == "/" ? "/" + name : absl::StrCat(path, "/", name);
        RETURN_IF_ERROR(Expect("node", child));
        RETURN_IF_ERROR(Node(child, depth + 1));
        RETURN_IF_ERROR(Expect(")", child));
        previous = std::move(name);
        first = false;
      }
    } else {
      return Malformed(path, absl::StrCat("unknown type '", absl::CHexEscape(type), "'"));
    }
    return Expect(")", path);
  }

  NarSource source_;
  const NarLimits& limits_;
  const bool prefix_;
  std::string* const root_file_;
  const uint64_t max_root_file_;
  std::vector<char> buffer_;
  size_t begin_ = 0, end_ = 0;
  uint64_t consumed_ = 0;
  uint64_t entries_ = 0;
  Sha256 hash_;
  NarSummary summary_;
};

}  // namespace

absl::StatusOr<NarSummary> ReadNar(NarSource source, const NarLimits& limits) {
  return NarParser(source, limits).Parse();
}

absl::StatusOr<NarSummary> ReadNarPrefix(NarSource source, const NarLimits& limits) {
  return NarParser(source, limits, /*prefix=*/true).Parse();
}

namespace {

// A source over bytes held in memory.
auto MemorySource(absl::string_view bytes, size_t& at) {
  return [bytes, &at](char* buf, size_t size) -> absl::StatusOr<size_t> {
    const size_t n = std::min(size, bytes.size() - at);
    std::memcpy(buf, bytes.data() + at, n);
    at += n;
    return n;
  };
}

}  // namespace

absl::StatusOr<NarSummary> ReadNar(absl::string_view nar, const NarLimits& limits) {
  size_t at = 0;
  return ReadNar(MemorySource(nar, at), limits);
}

absl::StatusOr<std::string> RegularFileOfNar(absl::string_view nar, uint64_t max_bytes) {
  size_t at = 0;
  std::string contents;
  ASSIGN_OR_RETURN(NarSummary summary,
                   NarParser(MemorySource(nar, at), NarLimits{}, /*prefix=*/false, &contents, max_bytes).Parse());
  if (summary.directories != 0 || summary.symlinks != 0 || summary.regular_files != 1) {
    return absl::InvalidArgumentError("the NAR's root is not a regular file");
  }
  return contents;
}

}  // namespace kiln
