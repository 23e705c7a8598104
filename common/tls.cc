#include "common/tls.h"

#include "common/status_macros.h"

#include <openssl/pem.h>
#include <openssl/x509.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/net.h"
#include "common/source_tree.h"

namespace kiln {
namespace {

absl::StatusOr<std::string> ReadPem(const std::string& path, const char* flag) {
  std::string text;
  if (absl::Status s = ReadWholeFile(path, text); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(flag, ": cannot read ", path, ": ", s.message()));
  }
  if (text.find("-----BEGIN ") == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(flag, ": ", path, " is not a PEM file"));
  }
  return text;
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(const TlsFiles& files) {
  if (!files.enabled()) return grpc::InsecureServerCredentials();
  if (files.cert.empty() || files.key.empty() || files.ca.empty()) {
    return absl::InvalidArgumentError(
        "--tls-cert, --tls-key and --tls-ca go together: the coordinator needs its certificate, its key and the "
        "farm's CA (to verify workers)");
  }
  ASSIGN_OR_RETURN(std::string cert, ReadPem(files.cert, "--tls-cert"));
  ASSIGN_OR_RETURN(std::string key, ReadPem(files.key, "--tls-key"));
  ASSIGN_OR_RETURN(std::string ca, ReadPem(files.ca, "--tls-ca"));
  // Request, and verify when shown: workers must show one (checked per
  // stream), the CLI authenticates with a token instead.
  grpc::SslServerCredentialsOptions options(GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY);
  options.pem_root_certs = ca;
  options.pem_key_cert_pairs.push_back({key, cert});
  return grpc::SslServerCredentials(options);
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(const TlsFiles& files) {
  if (!files.enabled()) return grpc::InsecureChannelCredentials();
  if (files.ca.empty()) {
    return absl::InvalidArgumentError("--tls-ca is needed to verify the coordinator's certificate");
  }
  if (files.cert.empty() != files.key.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
  }
  grpc::SslCredentialsOptions options;
  ASSIGN_OR_RETURN(options.pem_root_certs, ReadPem(files.ca, "--tls-ca"));
  if (!files.cert.empty()) {
    ASSIGN_OR_RETURN(options.pem_cert_chain, ReadPem(files.cert, "--tls-cert"));
    ASSIGN_OR_RETURN(options.pem_private_key, ReadPem(files.key, "--tls-key"));
  }
  return grpc::SslCredentials(options);
}

absl::Status CheckPlaintextAllowed(const std::string& role, const std::vector<std::string>& addresses) {
  std::vector<std::string> exposed;
  for (const std::string& address : addresses) {
    absl::StatusOr<HostPort> hp = ParseHostPort(address);
    if (!hp.ok() || !IsLoopbackHost(hp->host)) exposed.push_back(address);
  }
  if (exposed.empty()) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      role, " will not use plaintext gRPC on ", absl::StrJoin(exposed, ", "),
      ": only loopback addresses may go without TLS. Give --tls-cert, --tls-key and --tls-ca (deploy/pki/ makes "
      "them), or use 127.0.0.1"));
}

absl::StatusOr<std::string> CertificateCommonName(const std::string& pem_path) {
  ASSIGN_OR_RETURN(const std::string pem, ReadPem(pem_path, "--tls-cert"));
  BIO* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
  X509* cert = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr);
  BIO_free(bio);
  if (cert == nullptr)
    return absl::InvalidArgumentError(absl::StrCat("--tls-cert: ", pem_path, " holds no certificate"));
  char name[256] = {0};
  const int n = X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, name, sizeof name);
  X509_free(cert);
  if (n <= 0) return absl::InvalidArgumentError(absl::StrCat("--tls-cert: ", pem_path, " has no common name"));
  return std::string(name, static_cast<size_t>(n));
}

std::string PeerCertificateName(const grpc::ServerContextBase& context) {
  const std::shared_ptr<const grpc::AuthContext> auth = context.auth_context();
  if (auth == nullptr) return "";
  const std::vector<grpc::string_ref> names = auth->FindPropertyValues("x509_common_name");
  if (names.empty()) return "";
  return std::string(names.front().data(), names.front().size());
}

}  // namespace kiln
