#include "worker/farm_cache_relay.h"

#include <civetweb.h>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "common/log.h"
#include "common/metrics_http.h"
#include "common/status_macros.h"
#include "common/subprocess.h"

namespace kiln {
namespace {

constexpr char kCacheInfo[] = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 10\n";
// Nix fetches narinfos and NARs over up to 25 connections at once
// (http-connections), each kept alive, and civetweb gives a kept-alive
// connection a thread of its own: with fewer threads the other connections
// wait for one to time out idle (measured: 5x slower substitution with 8).
constexpr int kThreads = 32;

void Extend(NixOptionList& options, const std::string& name, const std::string& value, bool first) {
  for (auto& [n, v] : options) {
    if (n == name) {
      v = v.empty() ? value : (first ? absl::StrCat(value, " ", v) : absl::StrCat(v, " ", value));
      return;
    }
  }
  options.emplace_back(absl::StrCat("extra-", name), value);
}

bool HashPartShaped(absl::string_view s) {
  if (s.size() != 32) return false;
  for (char c : s) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c))) return false;
  }
  return true;
}

}  // namespace

NixOptionList WithFarmSubstituter(NixOptionList options, const std::string& url, const std::string& public_key) {
  Extend(options, "substituters", url, /*first=*/true);
  Extend(options, "trusted-public-keys", public_key, /*first=*/false);
  const auto set_unless_given = [&](const std::string& name, const std::string& value) {
    for (const auto& [n, v] : options) {
      if (n == name) return;
    }
    options.emplace_back(name, value);
  };
  set_unless_given("narinfo-cache-negative-ttl", "0");
  // A substitution the farm could not finish is built instead.
  set_unless_given("fallback", "true");
  return options;
}

absl::StatusOr<std::unique_ptr<FarmCacheRelay>> FarmCacheRelay::Start(FarmStoreClient* farm, WorkerMetrics* metrics) {
  auto relay = std::unique_ptr<FarmCacheRelay>(new FarmCacheRelay(farm, metrics));
  ASSIGN_OR_RETURN(relay->context_, StartCivetweb("127.0.0.1:0", kThreads, "the farm store relay", &relay->address_));
  relay->url_ = absl::StrCat("http://", relay->address_);
  mg_set_request_handler(relay->context_, "/", &FarmCacheRelay::Handle, relay.get());
  return relay;
}

FarmCacheRelay::~FarmCacheRelay() { StopCivetweb(context_, address_); }

void FarmCacheRelay::PrimeNixCache(const std::string& nix_store, const NixOptionList& options) {
  const NixOptionList with_relay = NixOptionsFor(options);
  if (with_relay == options) return;
  ProcessSpec spec;
  spec.argv = {nix_store};
  for (const auto& [name, value] : with_relay) spec.argv.insert(spec.argv.end(), {"--option", name, value});
  spec.argv.insert(spec.argv.end(), {"--realise", "/nix/store/00000000000000000000000000000000-kiln-relay-probe"});
  // It fails (no one has that path); what counts is that it opened the cache.
  if (absl::StatusOr<CommandResult> r = RunCommand(spec, "", absl::Seconds(30)); !r.ok()) {
    LogWarning("farm-relay", "could not run ", nix_store, " to open the farm store's cache: ", r.status().message());
  }
}

NixOptionList FarmCacheRelay::NixOptionsFor(const NixOptionList& options) {
  std::string key;
  {
    absl::MutexLock lock(&mu_);
    const absl::Duration again = public_key_.empty() ? absl::Seconds(5) : absl::Minutes(10);
    if (absl::Now() - key_asked_ < again) {
      key = public_key_;
    } else {
      key_asked_ = absl::Now();
    }
  }
  if (key.empty()) {
    // Asked outside the lock: the call may take its deadline.
    absl::StatusOr<std::string> fetched = farm_->PublicKey();
    absl::MutexLock lock(&mu_);
    if (fetched.ok() && !fetched->empty()) {
      public_key_ = *fetched;
    } else if (!fetched.ok() && !absl::IsUnimplemented(fetched.status())) {
      LogWarning("farm-relay", "no farm store key yet (", fetched.status().message(),
                 "): this build's Nix does not substitute from the farm");
    }
    key = public_key_;
  }
  if (key.empty()) return options;
  return WithFarmSubstituter(options, url_, key);
}

FarmCacheRelay::Counts FarmCacheRelay::counts() const {
  absl::MutexLock lock(&mu_);
  return counts_;
}

int FarmCacheRelay::Handle(mg_connection* conn, void* self) { return static_cast<FarmCacheRelay*>(self)->Serve(conn); }

int FarmCacheRelay::Serve(mg_connection* conn) {
  const mg_request_info* request = mg_get_request_info(conn);
  const std::string method = request->request_method != nullptr ? request->request_method : "";
  const std::string uri = request->local_uri != nullptr ? request->local_uri : "";
  // Answers say no-store: Nix keeps its own narinfo cache, nothing else reads them.
  auto respond = [&](int status, const char* type, const std::string& body) {
    RespondHttp(conn, status, type, body);
    return status;
  };
  if (method != "GET" && method != "HEAD") return respond(405, "text/plain", "only GET and HEAD\n");
  if (uri == "/nix-cache-info") return respond(200, "text/x-nix-cache-info", kCacheInfo);
  if (absl::EndsWith(uri, ".narinfo")) {
    const std::string hash_part(absl::StripSuffix(absl::StripPrefix(uri, "/"), ".narinfo"));
    if (!HashPartShaped(hash_part)) return respond(404, "text/plain", "not a narinfo name\n");
    const absl::Time start = absl::Now();
    absl::StatusOr<std::string> info = farm_->NarInfo(hash_part);
    {
      absl::MutexLock lock(&mu_);
      counts_.narinfo_time += absl::Now() - start;
      ++(info.ok() ? counts_.narinfo_hits : absl::IsNotFound(info.status()) ? counts_.narinfo_misses : counts_.errors);
    }
    if (metrics_ != nullptr) {
      metrics_->FarmNarInfoRequests(info.ok() ? "hit" : absl::IsNotFound(info.status()) ? "miss" : "error").Increment();
    }
    if (absl::IsNotFound(info.status())) return respond(404, "text/plain", "not in the farm store\n");
    // Not a 404: Nix must not take "the farm is unreachable" for "absent".
    if (!info.ok()) return respond(502, "text/plain", absl::StrCat("farm store: ", info.status().message(), "\n"));
    return respond(200, "text/x-nix-narinfo", *info);
  }
  if (absl::StartsWith(uri, "/nar/") && uri.find('/', 5) == std::string::npos) {
    if (method == "HEAD") return respond(200, "application/x-nix-nar", "");
    bool started = false;
    uint64_t bytes = 0;
    const absl::Time start = absl::Now();
    absl::StatusOr<std::string> url = farm_->FetchNarOrUrl(uri.substr(5), [&](absl::string_view data) -> absl::Status {
      if (!started) {
        mg_send_http_ok(conn, "application/x-nix-nar", -1);  // Chunked: the size is the farm's to know.
        started = true;
      }
      if (data.empty()) return absl::OkStatus();
      if (mg_send_chunk(conn, data.data(), static_cast<unsigned int>(data.size())) < 0) {
        return absl::CancelledError("Nix closed the connection");
      }
      bytes += data.size();
      return absl::OkStatus();
    });
    const absl::Status fetched = url.status();
    if (url.ok() && !url->empty() && !started) {
      // In object storage: Nix fetches it there (and checks its NarHash).
      mg_printf(conn, "HTTP/1.1 302 Found\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n", url->c_str());
      absl::MutexLock lock(&mu_);
      ++counts_.nars;
      return 302;
    }
    {
      absl::MutexLock lock(&mu_);
      counts_.nar_time += absl::Now() - start;
      if (fetched.ok()) {
        ++counts_.nars;
        counts_.nar_bytes += bytes;
        if (metrics_ != nullptr) metrics_->farm_substituted_bytes.Increment(static_cast<double>(bytes));
      } else {
        ++counts_.errors;
      }
    }
    if (!started) {
      if (fetched.ok())
        mg_send_http_ok(conn, "application/x-nix-nar", -1);
      else if (absl::IsNotFound(fetched))
        return respond(404, "text/plain", "no such NAR\n");
      else
        return respond(502, "text/plain", absl::StrCat("farm store: ", fetched.message(), "\n"));
    }
    if (fetched.ok()) {
      mg_send_chunk(conn, "", 0);  // The last chunk.
      return 200;
    }
    // Cut short after the header. Nix checks every NAR it substitutes
    // against the signed NarHash, so a short body fails the substitution,
    // and the worker's Nix then builds the path instead (`fallback`).
    LogWarning("farm-relay", "NAR ", uri.substr(5), " cut short: ", fetched.message());
    return 500;
  }
  return respond(404, "text/plain", "not found\n");
}

}  // namespace kiln
