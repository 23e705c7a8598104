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

int Fail(const std::string& message, int code = 1) {
  std::fprintf(stderr, "kiln-coordinator token: %s\n", message.c_str());
  return code;
}

nlohmann::json ToJson(const kiln::v1::TokenInfo& info) {
  return {{"name", info.name()},
          {"id", info.id()},
          {"scopes", std::vector<std::string>(info.scopes().begin(), info.scopes().end())},
          {"createdAt", absl::FormatTime(absl::RFC3339_sec, FromProtoTime(info.created_at()), absl::UTCTimeZone())}};
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

  // A running coordinator answers on its admin socket.
  const std::string socket = (std::filesystem::path(command.state_dir) / "admin.sock").string();
  grpc::Status status(grpc::StatusCode::UNAVAILABLE, "no admin socket");
  struct stat st {};
  if (::stat(socket.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) {
    auto stub =
        kiln::v1::AdminService::NewStub(grpc::CreateChannel("unix:" + socket, grpc::InsecureChannelCredentials()));
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    if (command.action == "create") status = stub->CreateToken(&context, create, &created);
    if (command.action == "list") status = stub->ListTokens(&context, {}, &listed);
    if (command.action == "revoke") status = stub->RevokeToken(&context, revoke, &revoked);
  }
  if (status.error_code() == grpc::StatusCode::UNAVAILABLE) {
    // Nobody answers: work on the state directly (RocksDB's lock refuses
    // this while a coordinator holds the state).
    std::error_code ec;
    std::filesystem::create_directories(command.state_dir, ec);
    std::filesystem::permissions(command.state_dir, std::filesystem::perms::owner_all, ec);
    absl::StatusOr<std::unique_ptr<RocksDbStateStore>> store =
        RocksDbStateStore::Open((std::filesystem::path(command.state_dir) / "rocksdb").string(), /*sync=*/true);
    if (!store.ok()) {
      return Fail(absl::StrCat("no coordinator answers on ", socket,
                               " and the state cannot be opened: ", store.status().message()));
    }
    AdminServiceImpl direct((*store)->tokens(), nullptr);
    const kiln::v1::ListTokensRequest list_request;
    grpc::ServerContext context;
    if (command.action == "create") status = direct.CreateToken(&context, &create, &created);
    if (command.action == "list") status = direct.ListTokens(&context, &list_request, &listed);
    if (command.action == "revoke") status = direct.RevokeToken(&context, &revoke, &revoked);
  }
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

}  // namespace kiln
