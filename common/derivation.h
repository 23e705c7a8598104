// Store derivations (.drv files) read from their ATerm text, and the key that
// identifies what a fixed-output derivation (FOD) computes.
//
// The ATerm form `Derive([outputs],[inputDrvs],[inputSrcs],system,builder,
// [args],[env])` has not changed since Nix 2.0, unlike the JSON that `nix
// show-derivation` prints, so it is what Kiln reads.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/nix_hash.h"

namespace kiln {

struct DerivationOutput {
  std::string path;
  std::string hash_algo;  // "" for input-addressed; "sha256", "r:sha256", "text:sha256" …
  std::string hash;       // The declared hash, base16, for fixed outputs.
};

struct Derivation {
  std::map<std::string, DerivationOutput> outputs;
  std::map<std::string, std::vector<std::string>> input_drvs;  // .drv path -> output names
  std::vector<std::string> input_srcs;
  std::string system;
  std::string builder;
  std::vector<std::string> args;
  std::map<std::string, std::string> env;
};

absl::StatusOr<Derivation> ParseDerivation(absl::string_view aterm);

// What a fixed-output derivation declares, with the key of what it computes.
struct FixedOutput {
  std::string name;         // The derivation's name ("node-modules").
  std::string output_path;  // Depends on the declared hash.
  std::string mode;         // "flat", "recursive" or "text".
  NixHash declared;         // All zeros for `lib.fakeHash` and "".
  // Hex SHA-256 of everything that determines the output and nothing that
  // depends on the declared hash: system, builder, args and env with every
  // output path blanked and outputHash removed, the hash algorithm and mode,
  // and the input paths — the sources and the outputs used of the input
  // derivations, i.e. of the resolved derivation (ResolveInputs). A fake, a
  // stale and the right hash for the same inputs share a key; and the key
  // of a .drv read from a store equals that of the same derivation as a
  // remote builder receives it (already resolved). Empty when `drv` is not
  // resolved.
  std::string key;
};

// The fixed output of `drv`, or nothing when it is not a FOD (content
// addressed floating outputs and input-addressed derivations are not).
std::optional<FixedOutput> GetFixedOutput(const Derivation& drv);

// Output paths of derivations, by .drv path and output name.
using OutputPaths = std::map<std::string, std::map<std::string, std::string>>;

// `drv` as Nix's BasicDerivation (what build-derivation carries): every
// input derivation replaced by the paths of the outputs it is used for,
// among the input sources. An input derivation or output not in `known`, or
// without a path (a floating content-addressed output), is an error.
absl::StatusOr<Derivation> ResolveInputs(const Derivation& drv, const OutputPaths& known);

// A FOD met while walking a closure.
struct ClosureFod {
  std::string drv_path;
  FixedOutput fod;
  std::vector<std::string> input_srcs;
};

// The text of a .drv file, from wherever it is kept (the local store, the
// farm store).
using DerivationSource = absl::FunctionRef<absl::StatusOr<std::string>(const std::string& drv_path)>;

// Reads `tops` and every .drv they depend on, breadth first, each once,
// through `read`; `visit` gets each parsed (after its inputs are queued).
// More than `max_derivations` is RESOURCE_EXHAUSTED.
absl::Status WalkDerivations(const std::vector<std::string>& tops, size_t max_derivations, DerivationSource read,
                             absl::FunctionRef<void(const std::string& path, Derivation& drv)> visit);

// Reads the .drv file `top_drv` and every .drv it depends on, transitively,
// from the local store, and returns the FODs among them (`top_drv` included),
// in the order met. More than `max_derivations` files is an error.
absl::StatusOr<std::vector<ClosureFod>> FixedOutputsOfClosure(const std::string& top_drv,
                                                              size_t max_derivations = 200000);

// One derivation of a closure, with what scheduling it as a step needs.
struct ClosureNode {
  std::string drv_path;
  std::string name;  // Of the .drv path ("hello-2.12").
  std::string system;
  std::vector<std::string> input_drvs;         // .drv paths, sorted.
  std::map<std::string, std::string> outputs;  // Name -> path ("" for floating content-addressed).
  std::vector<std::string> required_features;  // requiredSystemFeatures.
  bool prefer_local_build = false;
  bool allow_substitutes = true;
};

// A target's derivation closure: every derivation, inputs before the
// derivations that need them, and its FODs as FixedOutputsOfClosure finds
// them (one walk for both). Derivations with structured attributes
// (`__json`) are read as their ATerm has them: features and flags set
// inside the JSON are not seen.
struct DerivationClosure {
  std::vector<ClosureNode> nodes;
  std::vector<ClosureFod> fods;
};
absl::StatusOr<DerivationClosure> ReadDerivationClosure(const std::string& top_drv, size_t max_derivations = 200000);

// "/nix/store/<32 chars>-name[.drv]" -> "name".
std::string StorePathName(absl::string_view path);

}  // namespace kiln
