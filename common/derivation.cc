#include "common/derivation.h"

#include <algorithm>
#include <deque>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/functional/function_ref.h"

#include "absl/strings/match.h"
#include "absl/strings/strip.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "common/digest.h"
#include "common/source_tree.h"
#include "common/status_macros.h"

namespace kiln {
namespace {

// A cursor over ATerm text. Errors name the offset, which is all a person
// needs to find the spot in a .drv file.
class ATermReader {
 public:
  explicit ATermReader(absl::string_view text) : text_(text) {}

  bool ok() const { return error_.empty(); }
  const std::string& error() const { return error_; }
  bool AtEnd() const { return pos_ == text_.size(); }

  void Expect(absl::string_view token) {
    if (!ok()) return;
    if (text_.substr(pos_, token.size()) != token) {
      Fail(absl::StrCat("expected '", token, "'"));
      return;
    }
    pos_ += token.size();
  }

  // Consumes `c` if it is next.
  bool Take(char c) {
    if (ok() && pos_ < text_.size() && text_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }

  std::string String() {
    std::string out;
    Expect("\"");
    while (ok()) {
      if (pos_ >= text_.size()) {
        Fail("unterminated string");
        break;
      }
      const char c = text_[pos_++];
      if (c == '"') break;
      if (c != '\\') {
        out.push_back(c);
        continue;
      }
      if (pos_ >= text_.size()) {
        Fail("unterminated escape");
        break;
      }
      const char e = text_[pos_++];
      out.push_back(e == 'n' ? '\n' : e == 'r' ? '\r' : e == 't' ? '\t' : e);
    }
    return out;
  }

  // [a,b,…] with `item` reading one element.
  template <typename F>
  void List(F item) {
    Expect("[");
    if (Take(']')) return;
    do {
      item();
    } while (ok() && Take(','));
    Expect("]");
  }

  // ("key",value) with `value` reading what follows the key.
  template <typename F>
  void KeyedTuple(F value) {
    Expect("(");
    std::string key = String();
    Expect(",");
    value(std::move(key));
    Expect(")");
  }

  std::vector<std::string> Strings() {
    std::vector<std::string> out;
    List([&] { out.push_back(String()); });
    return out;
  }

  void Fail(absl::string_view why) {
    if (error_.empty()) error_ = absl::StrCat(why, " at offset ", pos_);
  }

 private:
  absl::string_view text_;
  size_t pos_ = 0;
  std::string error_;
};

// Length-prefixed fields, so no two different field lists hash alike.
void AddField(Sha256& h, absl::string_view field) {
  h.Update(absl::StrCat(field.size(), ":"));
  h.Update(field);
}

}  // namespace

absl::StatusOr<Derivation> ParseDerivation(absl::string_view aterm) {
  ATermReader r(aterm);
  Derivation drv;
  r.Expect("Derive(");
  r.List([&] {
    r.KeyedTuple([&](std::string name) {
      DerivationOutput out;
      out.path = r.String();
      r.Expect(",");
      out.hash_algo = r.String();
      r.Expect(",");
      out.hash = r.String();
      drv.outputs[std::move(name)] = std::move(out);
    });
  });
  r.Expect(",");
  r.List([&] { r.KeyedTuple([&](std::string path) { drv.input_drvs[std::move(path)] = r.Strings(); }); });
  r.Expect(",");
  drv.input_srcs = r.Strings();
  r.Expect(",");
  drv.system = r.String();
  r.Expect(",");
  drv.builder = r.String();
  r.Expect(",");
  drv.args = r.Strings();
  r.Expect(",");
  r.List([&] { r.KeyedTuple([&](std::string name) { drv.env[std::move(name)] = r.String(); }); });
  r.Expect(")");
  if (r.ok() && !r.AtEnd()) r.Fail("trailing text");
  if (!r.ok()) {
    // Newer formats (`DrvWithVersion(…)`, dynamic derivations) land here too.
    return absl::InvalidArgumentError(absl::StrCat("not a derivation in ATerm form: ", r.error()));
  }
  return drv;
}

std::optional<FixedOutput> GetFixedOutput(const Derivation& drv) {
  if (drv.outputs.size() != 1) return std::nullopt;
  const std::string& output_name = drv.outputs.begin()->first;
  const DerivationOutput& out = drv.outputs.begin()->second;
  if (out.hash.empty() || out.hash_algo.empty() || out.path.empty()) return std::nullopt;

  FixedOutput fod;
  absl::string_view algo = out.hash_algo;
  fod.mode = "flat";
  if (absl::ConsumePrefix(&algo, "r:")) {
    fod.mode = "recursive";
  } else if (absl::ConsumePrefix(&algo, "text:")) {
    fod.mode = "text";
  }
  absl::StatusOr<HashAlgo> parsed_algo = ParseHashAlgo(algo);
  if (!parsed_algo.ok()) return std::nullopt;
  absl::StatusOr<NixHash> declared = ParseNixHash(out.hash, *parsed_algo);
  if (!declared.ok()) return std::nullopt;
  fod.declared = *std::move(declared);
  fod.output_path = out.path;
  auto name = drv.env.find("name");
  fod.name = name != drv.env.end() ? name->second : StorePathName(out.path);

  // The output path is derived from the declared hash: wherever it appears
  // (in $out, in a script that mentions it) it stands in as a placeholder.
  const auto blank = [&](absl::string_view s) { return absl::StrReplaceAll(s, {{out.path, "<out>"}}); };
  if (!drv.input_drvs.empty()) return fod;  // No key: its inputs are not paths yet.
  Sha256 h;
  // v2: over resolved inputs (v1 hashed the input .drv paths, which a
  // remote builder's request does not carry).
  AddField(h, "kiln-fod-key-v2");
  AddField(h, drv.system);
  AddField(h, blank(drv.builder));
  AddField(h, absl::StrCat(drv.args.size()));
  for (const std::string& arg : drv.args) AddField(h, blank(arg));
  for (const auto& [name, value] : drv.env) {  // Sorted by name: std::map.
    // outputHash is the declared hash itself; the algorithm and mode enter
    // the key below in their normalised form, however they were written.
    if (name == output_name || name == "outputHash" || name == "outputHashAlgo" || name == "outputHashMode") continue;
    AddField(h, name);
    AddField(h, blank(value));
  }
  AddField(h, "|");
  AddField(h, HashAlgoName(*parsed_algo));
  AddField(h, fod.mode);
  std::vector<std::string> srcs = drv.input_srcs;
  std::sort(srcs.begin(), srcs.end());
  srcs.erase(std::unique(srcs.begin(), srcs.end()), srcs.end());
  for (const std::string& src : srcs) AddField(h, src);
  fod.key = h.FinishHex();
  return fod;
}

absl::StatusOr<Derivation> ResolveInputs(const Derivation& drv, const OutputPaths& known) {
  Derivation resolved = drv;
  resolved.input_drvs.clear();
  for (const auto& [input, names] : drv.input_drvs) {
    auto outputs = known.find(input);
    if (outputs == known.end()) return absl::NotFoundError(absl::StrCat("input derivation ", input, " is unknown"));
    for (const std::string& name : names) {
      auto out = outputs->second.find(name);
      if (out == outputs->second.end() || out->second.empty()) {
        return absl::NotFoundError(absl::StrCat("input derivation ", input, " has no output path for '", name, "'"));
      }
      resolved.input_srcs.push_back(out->second);
    }
  }
  std::sort(resolved.input_srcs.begin(), resolved.input_srcs.end());
  resolved.input_srcs.erase(std::unique(resolved.input_srcs.begin(), resolved.input_srcs.end()),
                            resolved.input_srcs.end());
  return resolved;
}

absl::Status WalkDerivations(const std::vector<std::string>& tops, size_t max_derivations, DerivationSource read,
                             absl::FunctionRef<void(const std::string& path, Derivation& drv)> visit) {
  absl::flat_hash_set<std::string> seen(tops.begin(), tops.end());
  std::deque<std::string> pending(tops.begin(), tops.end());
  while (!pending.empty()) {
    const std::string path = std::move(pending.front());
    pending.pop_front();
    ASSIGN_OR_RETURN(std::string text, read(path));
    absl::StatusOr<Derivation> drv = ParseDerivation(text);
    if (!drv.ok()) return absl::InvalidArgumentError(absl::StrCat(path, ": ", drv.status().message()));
    for (const auto& [input, outputs] : drv->input_drvs) {
      if (!seen.insert(input).second) continue;
      if (seen.size() > max_derivations) {
        return absl::ResourceExhaustedError(
            absl::StrCat("the closure of ", tops.front(), " has more than ", max_derivations, " derivations"));
      }
      pending.push_back(input);
    }
    visit(path, *drv);
  }
  return absl::OkStatus();
}

namespace {

// A .drv file of the local store.
absl::StatusOr<std::string> ReadLocalDerivation(const std::string& path) {
  std::string text;
  RETURN_IF_ERROR(ReadWholeFile(path, text));
  return text;
}

// The FODs among `found`, keyed once resolved against every derivation's
// output paths. One whose inputs have no paths yet (floating
// content-addressed) has no key: it is built unchecked.
std::vector<ClosureFod> KeyedFods(const std::vector<std::pair<std::string, Derivation>>& found,
                                  const OutputPaths& outputs_of) {
  std::vector<ClosureFod> fods;
  for (const auto& [path, drv] : found) {
    absl::StatusOr<Derivation> resolved = ResolveInputs(drv, outputs_of);
    if (!resolved.ok()) continue;
    if (std::optional<FixedOutput> fod = GetFixedOutput(*resolved)) {
      fods.push_back({path, *std::move(fod), drv.input_srcs});
    }
  }
  return fods;
}

}  // namespace

absl::StatusOr<std::vector<ClosureFod>> FixedOutputsOfClosure(const std::string& top_drv, size_t max_derivations) {
  // The FODs met, unresolved (few), and every derivation's output paths
  // (small), to resolve them once the walk is done.
  std::vector<std::pair<std::string, Derivation>> found;
  OutputPaths outputs_of;
  RETURN_IF_ERROR(
      WalkDerivations({top_drv}, max_derivations, ReadLocalDerivation, [&](const std::string& path, Derivation& drv) {
        for (const auto& [name, out] : drv.outputs) outputs_of[path][name] = out.path;
        if (GetFixedOutput(drv).has_value()) found.emplace_back(path, std::move(drv));
      }));
  return KeyedFods(found, outputs_of);
}

absl::StatusOr<DerivationClosure> ReadDerivationClosure(const std::string& top_drv, size_t max_derivations) {
  std::vector<std::pair<std::string, Derivation>> found;
  OutputPaths outputs_of;
  std::vector<ClosureNode> met;
  RETURN_IF_ERROR(
      WalkDerivations({top_drv}, max_derivations, ReadLocalDerivation, [&](const std::string& path, Derivation& drv) {
        ClosureNode& node = met.emplace_back();
        node.drv_path = path;
        node.name = StorePathName(path);
        node.system = drv.system;
        for (const auto& [input, outputs] : drv.input_drvs) node.input_drvs.push_back(input);
        for (const auto& [name, out] : drv.outputs) node.outputs[name] = outputs_of[path][name] = out.path;
        const auto env = [&](const char* key) -> const std::string* {
          auto it = drv.env.find(key);
          return it == drv.env.end() ? nullptr : &it->second;
        };
        if (const std::string* f = env("requiredSystemFeatures")) {
          node.required_features = absl::StrSplit(*f, ' ', absl::SkipEmpty());
        }
        // Nix writes a false attribute as "" and a true one as "1".
        if (const std::string* p = env("preferLocalBuild")) node.prefer_local_build = *p == "1";
        if (const std::string* a = env("allowSubstitutes")) node.allow_substitutes = *a == "1";
        if (GetFixedOutput(drv).has_value()) found.emplace_back(path, std::move(drv));
      }));
  // Inputs before what needs them (Kahn's order over the walk's).
  absl::flat_hash_map<std::string, size_t> index, waiting;
  absl::flat_hash_map<std::string, std::vector<size_t>> needed_by;
  for (size_t i = 0; i < met.size(); ++i) index[met[i].drv_path] = i;
  std::deque<size_t> ready;
  for (size_t i = met.size(); i-- > 0;) {
    waiting[met[i].drv_path] = met[i].input_drvs.size();
    for (const std::string& in : met[i].input_drvs) needed_by[in].push_back(i);
    if (met[i].input_drvs.empty()) ready.push_back(i);
  }
  DerivationClosure closure;
  closure.nodes.reserve(met.size());
  while (!ready.empty()) {
    const size_t i = ready.front();
    ready.pop_front();
    for (size_t d : needed_by[met[i].drv_path]) {
      if (--waiting[met[d].drv_path] == 0) ready.push_back(d);
    }
    closure.nodes.push_back(std::move(met[i]));
  }
  if (closure.nodes.size() != met.size()) return absl::InvalidArgumentError("the derivation graph has a cycle");
  closure.fods = KeyedFods(found, outputs_of);
  return closure;
}

std::string StorePathName(absl::string_view path) {
  absl::string_view base = path.substr(path.rfind('/') + 1);
  if (base.size() > 33 && base[32] == '-') base.remove_prefix(33);
  absl::ConsumeSuffix(&base, ".drv");
  return std::string(base);
}

}  // namespace kiln
