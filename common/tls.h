// Transport security of Kiln's gRPC: mutual TLS between workers and the
// coordinator (OpenSSL, through gRPC's SSL credentials), server-verified TLS
// for the CLI, and plaintext only where every address is loopback.
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kiln {

// PEM files named by --tls-cert, --tls-key and --tls-ca.
struct TlsFiles {
  std::string cert;  // This end's certificate (chain), shown to the peer.
  std::string key;   // Its private key.
  std::string ca;    // The farm's CA: the peer's certificate must chain to it.
  bool enabled() const { return !cert.empty() || !key.empty() || !ca.empty(); }
};

// The coordinator's credentials: with TLS files, TLS that asks every client
// for a certificate and verifies any it is shown against the CA (workers
// must show one; the CLI need not). Without, plaintext.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(const TlsFiles& files);

// A client's credentials: the CA to verify the server by and, when given,
// the certificate and key to prove who this end is. Without files,
// plaintext.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(const TlsFiles& files);

// Refuses plaintext on any address that is not loopback: `role` names the
// daemon in the error, `addresses` are host:port it listens on or dials.
absl::Status CheckPlaintextAllowed(const std::string& role, const std::vector<std::string>& addresses);

// The common name (CN) in a PEM certificate file: a worker's name.
absl::StatusOr<std::string> CertificateCommonName(const std::string& pem_path);

// The common name of the certificate the peer presented and the server
// verified; "" when it presented none (or the connection is plaintext).
std::string PeerCertificateName(const grpc::ServerContextBase& context);

}  // namespace kiln
