#include "common/hash_mismatch.h"

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/match.h"
#include "absl/strings/strip.h"
#include "absl/strings/str_split.h"
#include "common/nix_hash.h"
#include "common/nix_log.h"

namespace kiln {
namespace {

constexpr absl::string_view kHeader = "hash mismatch in fixed-output derivation '";
// A mismatch's detail lines follow its header closely; this bounds the look.
constexpr size_t kMaxDetailLines = 8;

// "  label:   value trailing" -> "value" when the line starts with `label`.
bool FieldValue(absl::string_view line, absl::string_view label, std::string* value) {
  line = absl::StripLeadingAsciiWhitespace(line);
  if (!absl::ConsumePrefix(&line, label)) return false;
  line = absl::StripLeadingAsciiWhitespace(line);
  *value = std::string(line.substr(0, line.find_first_of(" \t")));
  return true;
}

std::string ToSri(const std::string& spelled) {
  absl::StatusOr<NixHash> hash = ParseNixHash(spelled);
  return hash.ok() ? hash->Sri() : "";
}

}  // namespace

std::vector<HashMismatch> ParseHashMismatches(absl::string_view text) {
  const std::string plain = StripAnsi(text);
  std::vector<absl::string_view> lines = absl::StrSplit(plain, '\n');
  std::vector<HashMismatch> found;
  for (size_t i = 0; i < lines.size(); ++i) {
    const size_t at = lines[i].find(kHeader);
    if (at == absl::string_view::npos) continue;
    absl::string_view rest = lines[i].substr(at + kHeader.size());
    const size_t quote = rest.find('\'');
    if (quote == absl::string_view::npos) continue;
    HashMismatch m;
    m.path = std::string(rest.substr(0, quote));
    m.path_is_drv = absl::EndsWith(m.path, ".drv");
    std::string specified, got;
    for (size_t j = i + 1; j < lines.size() && j <= i + kMaxDetailLines; ++j) {
      if (absl::StrContains(lines[j], kHeader)) break;
      std::string value;
      if (FieldValue(lines[j], "specified:", &value) || FieldValue(lines[j], "wanted:", &value)) {
        specified = value;
      } else if (FieldValue(lines[j], "got:", &value)) {
        got = value;
      } else if (FieldValue(lines[j], "likely URL:", &value) && value != "(unknown)") {
        m.url = value;
      }
    }
    m.specified = ToSri(specified);
    m.got = ToSri(got);
    if (m.specified.empty() || m.got.empty()) continue;
    found.push_back(std::move(m));
  }
  return found;
}

std::string FixLine(const kiln::v1::HashMismatch& m) {
  return absl::StrCat("  fix: in the FOD '", m.name(), "', set outputHash = \"", m.got(), "\";");
}

std::string DescribeMismatch(const kiln::v1::HashMismatch& m, absl::string_view computed_at) {
  std::string text = absl::StrCat("hash mismatch in fixed-output derivation '", m.drv_path(), "':\n",
                                  "  specified: ", m.specified(), "\n", "  got:       ", m.got(), "\n");
  if (m.source() == "cache") {
    absl::StrAppend(&text, "  (from Kiln's FOD cache: computed by job ", m.computed_by_job(), " on ",
                    m.computed_by_worker(), computed_at.empty() ? "" : ", ", computed_at,
                    "; this FOD was not built)\n");
  } else if (m.source() == "check") {
    absl::StrAppend(&text, "  (stale: the declared hash was computed for other inputs of '", m.name(),
                    "'; rebuilding the output this worker held gave the hash above)\n");
  }
  absl::StrAppend(&text, FixLine(m));
  return text;
}

kiln::v1::FodRef RefOf(const ClosureFod& c) {
  kiln::v1::FodRef ref;
  ref.set_key(c.fod.key);
  ref.set_name(c.fod.name);
  ref.set_declared(c.fod.declared.Sri());
  ref.set_drv_path(c.drv_path);
  ref.set_algo(std::string(HashAlgoName(c.fod.declared.algo)));
  ref.set_mode(c.fod.mode);
  return ref;
}

}  // namespace kiln
