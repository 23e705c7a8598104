#include "cli/fod_edit.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/nix_hash.h"
#include "common/source_tree.h"
#include "common/status_macros.h"

namespace kiln {
namespace fs = std::filesystem;
namespace {

constexpr size_t kMaxNixFiles = 10000;
// How far above a fake hash its derivation's name is looked for.
constexpr int kNameLookback = 40;

struct NixFile {
  std::string rel;
  std::vector<std::string> lines;
};

// A span of one line to replace.
struct Occurrence {
  size_t file = 0;
  size_t line = 0;
  size_t col = 0;
  size_t len = 0;
  bool quote = false;  // The replacement needs its own quotes.
};

bool IdentChar(char c) { return absl::ascii_isalnum(c) || c == '_' || c == '\'' || c == '-'; }
bool HashChar(char c) { return absl::ascii_isalnum(c) || c == '+' || c == '/' || c == '=' || c == ':' || c == '-'; }

absl::StatusOr<std::vector<NixFile>> ReadNixFiles(const std::string& dir) {
  std::vector<NixFile> files;
  std::error_code ec;
  fs::recursive_directory_iterator it(dir, fs::directory_options::none, ec), end;
  if (ec) return absl::NotFoundError(absl::StrCat("cannot read ", dir, ": ", ec.message()));
  for (; it != end; it.increment(ec)) {
    if (ec) return absl::InternalError(absl::StrCat("cannot read ", dir, ": ", ec.message()));
    const std::string name = it->path().filename().string();
    if (it->is_symlink(ec)) continue;  // `result` links into the store, among others.
    if (it->is_directory(ec)) {
      if (absl::StartsWith(name, ".")) it.disable_recursion_pending();
      continue;
    }
    if (!absl::EndsWith(name, ".nix") || !it->is_regular_file(ec)) continue;
    if (files.size() >= kMaxNixFiles)
      return absl::ResourceExhaustedError(absl::StrCat("more than ", kMaxNixFiles, " .nix files under ", dir));
    std::string text;
    RETURN_IF_ERROR(ReadWholeFile(it->path().string(), text));
    NixFile f;
    f.rel = fs::relative(it->path(), dir).string();
    f.lines = absl::StrSplit(text, '\n');
    files.push_back(std::move(f));
  }
  std::sort(files.begin(), files.end(), [](const NixFile& a, const NixFile& b) { return a.rel < b.rel; });
  return files;
}

// Every spelling of `sri` Nix accepts in a .nix file.
std::vector<std::string> Spellings(const std::string& sri) {
  absl::StatusOr<NixHash> h = ParseNixHash(sri);
  if (!h.ok()) return {sri};
  const std::string algo(HashAlgoName(h->algo));
  return {h->Sri(), h->Base32(), h->Base16(), absl::StrCat(algo, ":", h->Base32()),
          absl::StrCat(algo, ":", h->Base16())};
}

// Occurrences of any of `literals` as a whole hash token.
std::vector<Occurrence> FindLiterals(const std::vector<NixFile>& files, const std::vector<std::string>& literals) {
  std::vector<Occurrence> found;
  for (size_t f = 0; f < files.size(); ++f) {
    for (size_t l = 0; l < files[f].lines.size(); ++l) {
      const std::string& line = files[f].lines[l];
      for (const std::string& lit : literals) {
        for (size_t at = line.find(lit); at != std::string::npos; at = line.find(lit, at + 1)) {
          if (at > 0 && HashChar(line[at - 1])) continue;
          if (at + lit.size() < line.size() && HashChar(line[at + lit.size()])) continue;
          found.push_back({f, l, at, lit.size(), false});
        }
      }
    }
  }
  return found;
}

// Fake hashes: the fakeHash family (with any attribute path before it), an
// empty string given to a hash attribute, and all-zero literals.
std::vector<Occurrence> FindFakes(const std::vector<NixFile>& files) {
  static const std::regex kEmpty(R"(([A-Za-z_][A-Za-z0-9_'-]*)\s*=\s*"")");
  std::vector<std::string> zeros;
  for (HashAlgo algo : {HashAlgo::kSha256, HashAlgo::kSha512, HashAlgo::kSha1}) {
    NixHash z;
    z.algo = algo;
    z.bytes.assign(HashAlgoBytes(algo), '\0');
    for (std::string& s : Spellings(z.Sri())) zeros.push_back(std::move(s));
  }
  std::vector<Occurrence> found = FindLiterals(files, zeros);
  for (size_t f = 0; f < files.size(); ++f) {
    for (size_t l = 0; l < files[f].lines.size(); ++l) {
      const std::string& line = files[f].lines[l];
      for (const std::string token : {"fakeHash", "fakeSha256", "fakeSha512", "fakeSha1"}) {
        for (size_t at = line.find(token); at != std::string::npos; at = line.find(token, at + 1)) {
          const size_t after = at + token.size();
          if (after < line.size() && IdentChar(line[after])) continue;
          if (at > 0 && IdentChar(line[at - 1])) continue;
          size_t start = at;  // Take `lib.` or `pkgs.lib.` along.
          while (start > 1 && line[start - 1] == '.' && IdentChar(line[start - 2])) {
            start -= 2;
            while (start > 0 && IdentChar(line[start - 1])) --start;
          }
          found.push_back({f, l, start, after - start, true});
        }
      }
      for (auto m = std::sregex_iterator(line.begin(), line.end(), kEmpty); m != std::sregex_iterator(); ++m) {
        const std::string attr = (*m)[1].str();
        if (!absl::EndsWith(attr, "Hash") && !absl::EndsWith(attr, "hash") && attr != "sha256" && attr != "sha512") {
          continue;
        }
        const size_t quotes = static_cast<size_t>(m->position(0) + m->length(0)) - 2;
        found.push_back({f, l, quotes, 2, true});
      }
    }
  }
  return found;
}

// The nearest `name = "…"` or `pname = "…"` at or above the occurrence.
std::string NearestName(const NixFile& file, size_t line) {
  static const std::regex kName(R"((^|[^A-Za-z0-9_'-])p?name\s*=\s*"([^"$]*))");
  for (int l = static_cast<int>(line); l >= 0 && l >= static_cast<int>(line) - kNameLookback; --l) {
    std::smatch m;
    if (std::regex_search(file.lines[l], m, kName)) return m[2].str();
  }
  return "";
}

}  // namespace

absl::StatusOr<HashEditPlan> PlanHashEdits(const std::string& flake_dir, const std::vector<FodHashFix>& fixes,
                                           const std::vector<FodHashFix>& others) {
  absl::StatusOr<std::vector<NixFile>> files = ReadNixFiles(flake_dir);
  if (!files.ok()) return files.status();
  HashEditPlan plan;
  std::vector<std::pair<Occurrence, std::string>> chosen;  // Occurrence, correct SRI.
  const auto manual = [&](const FodHashFix& fix, absl::string_view why) {
    plan.left_to_do.push_back(absl::StrCat("FOD '", fix.name, "': set its hash to \"", fix.correct, "\" (", why, ")"));
  };

  std::vector<const FodHashFix*> fakes;
  for (const FodHashFix& fix : fixes) {
    absl::StatusOr<NixHash> declared = ParseNixHash(fix.declared);
    if (declared.ok() && declared->IsFake()) {
      fakes.push_back(&fix);
      continue;
    }
    // A stale literal: replace it if no other FOD declares it otherwise.
    bool shared = false;
    for (const FodHashFix& o : others) shared = shared || o.declared == fix.declared;
    for (const FodHashFix& o : fixes) shared = shared || (o.declared == fix.declared && o.correct != fix.correct);
    std::vector<Occurrence> at = FindLiterals(*files, Spellings(fix.declared));
    if (shared) {
      manual(fix, "other FODs declare the same hash");
    } else if (at.empty()) {
      manual(fix, absl::StrCat(fix.declared, " does not appear in the flake's .nix files"));
    } else {
      for (const Occurrence& o : at) chosen.emplace_back(o, fix.correct);
    }
  }

  if (!fakes.empty()) {
    std::vector<Occurrence> at = FindFakes(*files);
    if (fakes.size() == 1 && at.size() == 1) {
      chosen.emplace_back(at.front(), fakes.front()->correct);
    } else {
      // Match each fake occurrence to the one fake FOD its nearest name names.
      std::map<const FodHashFix*, std::vector<Occurrence>> by_fix;
      for (const Occurrence& o : at) {
        const std::string name = NearestName((*files)[o.file], o.line);
        const FodHashFix* match = nullptr;
        int matches = 0;
        for (const FodHashFix* fix : fakes) {
          if (!name.empty() && (fix->name == name || absl::StartsWith(fix->name, name + "-"))) {
            match = fix;
            ++matches;
          }
        }
        if (matches == 1) by_fix[match].push_back(o);
      }
      for (const FodHashFix* fix : fakes) {
        auto it = by_fix.find(fix);
        if (it != by_fix.end() && it->second.size() == 1) {
          chosen.emplace_back(it->second.front(), fix->correct);
        } else {
          manual(*fix, at.empty() ? "no fake hash found in the flake's .nix files"
                                  : "cannot tell which fake hash in the .nix files is this FOD's");
        }
      }
    }
  }

  // One edit per line, its spans replaced right to left.
  std::sort(chosen.begin(), chosen.end(), [](const auto& a, const auto& b) {
    return std::tie(a.first.file, a.first.line, b.first.col) < std::tie(b.first.file, b.first.line, a.first.col);
  });
  for (size_t i = 0; i < chosen.size();) {
    const Occurrence& first = chosen[i].first;
    HashEdit edit;
    edit.file = (*files)[first.file].rel;
    edit.line = static_cast<int>(first.line) + 1;
    edit.before = (*files)[first.file].lines[first.line];
    edit.after = edit.before;
    size_t last_col = std::string::npos;
    for (; i < chosen.size() && chosen[i].first.file == first.file && chosen[i].first.line == first.line; ++i) {
      const auto& [o, correct] = chosen[i];
      if (o.col + o.len > last_col) continue;  // Overlaps one already replaced.
      edit.after.replace(o.col, o.len, o.quote ? absl::StrCat("\"", correct, "\"") : correct);
      last_col = o.col;
    }
    plan.edits.push_back(std::move(edit));
  }
  return plan;
}

absl::Status ApplyHashEdits(const std::string& flake_dir, const HashEditPlan& plan) {
  std::map<std::string, std::vector<const HashEdit*>> by_file;
  for (const HashEdit& e : plan.edits) by_file[e.file].push_back(&e);
  for (const auto& [rel, edits] : by_file) {
    const std::string path = (fs::path(flake_dir) / rel).string();
    std::string text;
    RETURN_IF_ERROR(ReadWholeFile(path, text));
    std::vector<std::string> lines = absl::StrSplit(text, '\n');
    for (const HashEdit* e : edits) {
      if (e->line < 1 || static_cast<size_t>(e->line) > lines.size() || lines[e->line - 1] != e->before) {
        return absl::AbortedError(absl::StrCat(rel, ":", e->line, " changed since it was read; run the command again"));
      }
      lines[e->line - 1] = e->after;
    }
    const std::string temp = path + ".kiln-tmp";
    {
      std::ofstream out(temp, std::ios::binary | std::ios::trunc);
      out << absl::StrJoin(lines, "\n");
      if (!out) return absl::InternalError(absl::StrCat("cannot write ", temp));
    }
    std::error_code ec;
    fs::permissions(temp, fs::status(path, ec).permissions(), ec);
    fs::rename(temp, path, ec);
    if (ec) return absl::InternalError(absl::StrCat("cannot replace ", path, ": ", ec.message()));
  }
  return absl::OkStatus();
}

}  // namespace kiln
