#include "coordinator/token_command.h"

#include <grpcpp/grpcpp.h>
#include <sys/stat.h>

#include <cstdio>
#include <filesystem>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"
#include "common/grpc_util.h"
#include "coordinator/admin_service.h"
#include "coordinator/rocksdb_state_store.h"
#include "kiln/v1/admin.grpc.pb.h"

namespace kiln {
namespace {

int Fail(const std::string& message, int code = 1, const char* command = "token") {
  std::fprintf(stderr, "kiln-coordinator %s: %s\n", command, message.c_str());
  return code;
}

nlohmann::json ToJson(const kiln::v1::TokenInfo& info) {
  return {{"name", info.name()},
          {"id", info.id()},
          {"scopes", std::vector<std::string>(info.scopes().begin(), info.scopes().end())},
          {"createdAt", absl::FormatTime(absl::RFC3339_sec, FromProtoTime(info.created_at()), absl::UTCTimeZone())}};
}

// Runs a call on the running coordinator's admin socket or, when nobody
// answers there, on the state directory opened here (RocksDB's lock
// refuses that while a coordinator holds the state).
grpc::Status CallAdmin(const std::string& state_dir,
                       const std::function<grpc::Status(kiln::v1::AdminService::Stub&, grpc::ClientContext*)>& remote,
                       const std::function<grpc::Status(AdminServiceImpl&, grpc::ServerContext*)>& direct) {
  const std::string socket = (std::filesystem::path(state_dir) / "admin.sock").string();
  struct stat st {};
  if (::stat(socket.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) {
    auto stub =
        kiln::v1::AdminService::NewStub(grpc::CreateChannel("unix:" + socket, grpc::InsecureChannelCredentials()));
    grpc::ClientContext context;
    // A backup of a large CAS takes a while; the rest answers at once.
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::minutes(30));
    grpc::Status status = remote(*stub, &context);
    if (status.error_code() != grpc::StatusCode::UNAVAILABLE) return status;
  }
  std::error_code ec;
  std::filesystem::create_directories(state_dir, ec);
  std::filesystem::permissions(state_dir, std::filesystem::perms::owner_all, ec);
  absl::StatusOr<std::unique_ptr<RocksDbStateStore>> store =
      RocksDbStateStore::Open((std::filesystem::path(state_dir) / "rocksdb").string(), /*sync=*/true);
  if (!store.ok()) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                        absl::StrCat("no coordinator answers on ", socket,
                                     " and the state cannot be opened: ", store.status().message()));
  }
  AdminServiceImpl service((*store)->tokens(), nullptr, store->get());
  grpc::ServerContext context;
  return direct(service, &context);
}

}  // namespace

int RunTokenCommand(const TokenCommand& command) {
  if (command.state_dir.empty()) return Fail("--state-dir is required", 2);
  if (command.action != "create" && command.action != "list" && command.action != "revoke") {
    return Fail("usage: kiln-coordinator token create --name=NAME --scope=SCOPE,... | list | revoke NAME", 2);
  }
  if (command.action != "list" && command.name.empty()) {
    return Fail(command.action == "create" ? "--name is required" : "which token? (kiln-coordinator token revoke NAME)",
                2);
  }
  kiln::v1::CreateTokenRequest create;
  create.set_name(command.name);
  for (const std::string& s : command.scopes) create.add_scopes(s);
  kiln::v1::RevokeTokenRequest revoke;
  revoke.set_name(command.name);
  kiln::v1::CreateTokenResponse created;
  kiln::v1::ListTokensResponse listed;
  kiln::v1::RevokeTokenResponse revoked;

  grpc::Status status = CallAdmin(
      command.state_dir,
      [&](kiln::v1::AdminService::Stub& stub, grpc::ClientContext* context) {
        if (command.action == "create") return stub.CreateToken(context, create, &created);
        if (command.action == "list") return stub.ListTokens(context, {}, &listed);
        return stub.RevokeToken(context, revoke, &revoked);
      },
      [&](AdminServiceImpl& direct, grpc::ServerContext* context) {
        const kiln::v1::ListTokensRequest list_request;
        if (command.action == "create") return direct.CreateToken(context, &create, &created);
        if (command.action == "list") return direct.ListTokens(context, &list_request, &listed);
        return direct.RevokeToken(context, &revoke, &revoked);
      });
  if (!status.ok()) return Fail(status.error_message());

  if (command.action == "create") {
    if (command.json) {
      nlohmann::json j = ToJson(created.token());
      j["token"] = created.secret();
      std::printf("%s\n", j.dump().c_str());
    } else {
      std::printf("%s\n", created.secret().c_str());
      std::fprintf(stderr,
                   "kiln-coordinator: token '%s' (id %s, scopes %s) created. It is shown this once: give it to "
                   "the client as KILN_TOKEN.\n",
                   created.token().name().c_str(), created.token().id().c_str(),
                   absl::StrJoin(created.token().scopes(), ",").c_str());
    }
  } else if (command.action == "list") {
    if (command.json) {
      nlohmann::json all = nlohmann::json::array();
      for (const auto& t : listed.tokens()) all.push_back(ToJson(t));
      std::printf("%s\n", all.dump().c_str());
    } else {
      std::printf("%-24s %-16s %-20s %s\n", "NAME", "ID", "CREATED", "SCOPES");
      for (const auto& t : listed.tokens()) {
        std::printf("%-24s %-16s %-20s %s\n", t.name().c_str(), t.id().c_str(),
                    absl::FormatTime("%Y-%m-%d %H:%M:%S", FromProtoTime(t.created_at()), absl::UTCTimeZone()).c_str(),
                    absl::StrJoin(t.scopes(), ",").c_str());
      }
    }
  } else {
    std::fprintf(stderr, "kiln-coordinator: token '%s' (id %s) revoked\n", revoked.token().name().c_str(),
                 revoked.token().id().c_str());
  }
  return 0;
}

int RunBackupCommand(const std::string& state_dir, const std::string& destination, bool json) {
  if (state_dir.empty() || destination.empty()) {
    return Fail("usage: kiln-coordinator backup --state-dir=DIR DESTINATION", 2, "backup");
  }
  std::error_code ec;
  if (!std::filesystem::exists(std::filesystem::path(state_dir) / "rocksdb", ec)) {
    return Fail(absl::StrCat("no coordinator state in ", state_dir), 1, "backup");
  }
  kiln::v1::BackupRequest request;
  request.set_destination(std::filesystem::absolute(destination, ec).lexically_normal().string());
  kiln::v1::BackupResponse response;
  grpc::Status status = CallAdmin(
      state_dir,
      [&](kiln::v1::AdminService::Stub& stub, grpc::ClientContext* context) {
        return stub.Backup(context, request, &response);
      },
      [&](AdminServiceImpl& direct, grpc::ServerContext* context) {
        return direct.Backup(context, &request, &response);
      });
  if (!status.ok()) return Fail(status.error_message(), 1, "backup");
  if (json) {
    nlohmann::json j = {{"destination", response.destination()},
                        {"casFiles", response.cas_files()},
                        {"sstBytes", response.sst_bytes()},
                        {"hardLinked", response.hard_linked()}};
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("%s\n", response.destination().c_str());
    std::fprintf(stderr,
                 "kiln-coordinator backup: state copied to %s (%s, %llu CAS file(s)). Start a coordinator with "
                 "--state-dir=%s to restore it.\n",
                 response.destination().c_str(), response.hard_linked() ? "hard links" : "copies",
                 static_cast<unsigned long long>(response.cas_files()), response.destination().c_str());
  }
  return 0;
}

}  // namespace kiln
