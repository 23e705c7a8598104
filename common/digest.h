// SHA-256 digests (OpenSSL), as lowercase hex.
#pragma once

#include <string>

#include "absl/strings/string_view.h"

struct evp_md_ctx_st;  // OpenSSL's EVP_MD_CTX.

namespace kiln {

std::string Sha256Hex(absl::string_view data);

// Incremental SHA-256, for data that arrives in pieces.
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void Update(absl::string_view data);
  // The digest of everything so far, as hex. Ends the computation.
  std::string FinishHex();

 private:
  ::evp_md_ctx_st* ctx_;
};

// True for 64 lowercase hex characters.
bool IsSha256Hex(absl::string_view hex);

}  // namespace kiln
