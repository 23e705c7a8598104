#include "tests/support/local_farm.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <deque>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <regex>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"

extern char** environ;

namespace kiln::testing {
namespace fs = std::filesystem;

std::string BinPath(const std::string& name) {
  const char* dir = std::getenv("KILN_BIN_DIR");
  return std::string(dir ? dir : "build/bin") + "/" + name;
}

JsonBuildOutput ReadJsonBuild(const CommandResult& result) {
  JsonBuildOutput out;
  out.exit_code = result.exit.exit_code;
  out.printed = result.stdout_data;
  for (absl::string_view line : absl::StrSplit(result.stderr_data, '\n', absl::SkipEmpty())) {
    auto event = nlohmann::json::parse(line, nullptr, false);
    if (event.is_object() && event.contains("text") && event["text"].is_string()) {
      absl::StrAppend(&out.printed, event["text"].get<std::string>(), "\n");
    }
  }
  auto entries = nlohmann::json::parse(result.stdout_data, nullptr, false);
  if (entries.is_array() && !entries.empty()) out.entry = entries[0];
  return out;
}

std::vector<std::string> NixTestEnv() {
  return {"NIX_CONFIG=substituters =\nexperimental-features = nix-command flakes\nsandbox = false"};
}

absl::StatusOr<std::unique_ptr<Daemon>> Daemon::Start(const std::vector<std::string>& argv, const std::string& log_path,
                                                      const std::vector<std::string>& extra_env) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e) env.emplace_back(*e);
  env.insert(env.end(), extra_env.begin(), extra_env.end());
  std::vector<char*> c_argv, c_env;
  std::vector<std::string> args = argv;
  for (auto& a : args) c_argv.push_back(a.data());
  c_argv.push_back(nullptr);
  for (auto& e : env) c_env.push_back(e.data());
  c_env.push_back(nullptr);
  auto daemon = std::make_unique<Daemon>();
  int rc = posix_spawn(&daemon->pid_, c_argv[0], &actions, nullptr, c_argv.data(), c_env.data());
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) return absl::InternalError(absl::StrCat("cannot start ", argv[0]));
  return daemon;
}

Daemon::~Daemon() {
  if (pid_ > 0 && !exit_) Stop(10000).IgnoreError();
}

void Daemon::Kill(int signal) {
  if (pid_ > 0 && !exit_) ::kill(pid_, signal);
}

bool Daemon::WaitExit(int timeout_ms) {
  if (exit_) return true;
  for (int waited = 0; waited <= timeout_ms; waited += 10) {
    int status;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      ExitInfo exit;
      if (WIFSIGNALED(status)) {
        exit.signal = WTERMSIG(status);
      } else {
        exit.exit_code = WEXITSTATUS(status);
      }
      exit_ = exit;
      return true;
    }
    ::usleep(10000);
  }
  return false;
}

absl::StatusOr<ExitInfo> Daemon::Stop(int timeout_ms) {
  Kill(SIGTERM);
  if (WaitExit(timeout_ms)) return *exit_;
  Kill(SIGKILL);
  WaitExit(10000);
  return absl::DeadlineExceededError(absl::StrCat("did not stop within ", timeout_ms / 1000, " s of SIGTERM"));
}

std::string KeptLogsRoot() {
  if (const char* dir = std::getenv("KILN_KEPT_LOGS_DIR"); dir != nullptr && *dir) return dir;
  const char* tmp = std::getenv("TMPDIR");
  return std::string(tmp != nullptr && *tmp ? tmp : "/tmp") + "/kiln-kept-logs";
}

absl::StatusOr<nlohmann::json> WaitForReadyFile(const std::string& path, const std::string& log) {
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (absl::Now() < deadline) {
    if (fs::exists(path)) {
      std::ifstream in(path);
      nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
      if (!j.is_discarded()) return j;
    }
    absl::SleepFor(absl::Milliseconds(10));
  }
  std::ifstream in(log);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return absl::DeadlineExceededError(absl::StrCat("no ready file ", path, "; log:\n", text));
}

LocalFarm::LocalFarm(int workers, int max_jobs_per_worker)
    : workers_(workers), max_jobs_(max_jobs_per_worker), private_stores_(workers > 1) {}

LocalFarm::~LocalFarm() {
  StopAll();
  // A worker killed with SIGKILL leaves its nix processes (each in its own
  // process group) behind; one still waiting for its derivation on the
  // named pipe would wait forever. Under systemd the unit's cgroup goes
  // with the worker; here, whatever names this farm's directory goes.
  RunCommand({.argv = {"pkill", "-KILL", "-f", dir_.path() + "/worker-"}, .extra_env = {}, .cwd = ""}, "",
             absl::Seconds(10))
      .IgnoreError();
}

namespace {

// The end of a log, for a failure message.
std::string TailOf(const std::string& path, size_t lines) {
  std::ifstream in(path);
  std::deque<std::string> tail;
  for (std::string line; std::getline(in, line);) {
    tail.push_back(std::move(line));
    if (tail.size() > lines) tail.pop_front();
  }
  std::string text;
  for (const std::string& line : tail) absl::StrAppend(&text, "    ", line, "\n");
  return text;
}

}  // namespace

void LocalFarm::Note(const std::string& name, const absl::StatusOr<ExitInfo>& ended) {
  if (ended.ok() && ended->Success()) return;
  incidents_.push_back(
      absl::StrCat(name, ": ", ended.ok() ? ended->ToString() : std::string(ended.status().message())));
}

void LocalFarm::KillDaemon(const std::string& name, Daemon& daemon, int signal) {
  if (signal == SIGTERM) return Note(name, daemon.Stop(30000));
  daemon.Kill(signal);
  daemon.WaitExit(30000);
}

void LocalFarm::StopAll() {
  // Workers first, so none is left reconnecting to a stopped coordinator.
  // A worker stopping cancels its builds: Nix gets 10 s to stop them.
  for (size_t i = 0; i < worker_daemons_.size(); ++i) {
    if (worker_daemons_[i] && !worker_daemons_[i]->exit())
      KillDaemon(absl::StrCat("worker-", i + 1), *worker_daemons_[i], SIGTERM);
  }
  if (coordinator_ && !coordinator_->exit()) KillDaemon("coordinator", *coordinator_, SIGTERM);
  worker_daemons_.clear();
  coordinator_.reset();
  // A failed test keeps the logs too: the daemons' side of what it saw.
  const bool failed = ::testing::Test::HasFailure();
  if (incidents_.empty() && !failed) return;
  // Keep every log of the farm; the temporary directory goes with the farm.
  const ::testing::UnitTest& unit = *::testing::UnitTest::GetInstance();
  std::string label = "farm";
  if (const ::testing::TestInfo* test = unit.current_test_info(); test != nullptr) {
    label = absl::StrCat(test->test_suite_name(), ".", test->name());
  } else if (const ::testing::TestSuite* suite = unit.current_test_suite(); suite != nullptr) {
    label = suite->name();
  }
  const std::string kept =
      absl::StrCat(KeptLogsRoot(), "/", label, "-", ::getpid(), "-", absl::ToUnixMillis(absl::Now()));
  std::error_code ec;
  fs::create_directories(kept, ec);
  for (const auto& entry : fs::directory_iterator(dir_.path(), ec)) {
    if (entry.path().extension() == ".log") fs::copy_file(entry.path(), fs::path(kept) / entry.path().filename(), ec);
  }
  if (incidents_.empty()) {
    std::cerr << "the test failed; every log of its farm is kept in " << kept << "\n";
    return;
  }
  std::string message = "daemons of the farm did not end cleanly:\n";
  for (const std::string& incident : incidents_) {
    absl::StrAppend(&message, "  ", incident, "; the end of its log:\n",
                    TailOf(LogOf(incident.substr(0, incident.find(':'))), 40));
  }
  absl::StrAppend(&message, "every log of the farm is kept in ", kept);
  ADD_FAILURE() << message;
}

std::string LocalFarm::StoreDirOf(size_t index) const { return dir_.Sub(absl::StrCat("worker-", index + 1, "-nix")); }

namespace {

// Nix's environment inside a private store: separate stores keep separate
// build-user locks, so with build users two of them would take the same
// nixbld user and kill each other's builds.
// The machine's own cache directory too: Nix keeps what binary caches
// answered (negative narinfo lookups for an hour) under $XDG_CACHE_HOME,
// keyed by the cache's URL, and tests reuse loopback ports — a machine must
// not see another's (or an earlier test's) answers.
std::vector<std::string> PrivateStoreNixEnv(const std::string& nix_dir) {
  std::vector<std::string> env = NixTestEnv();
  for (std::string& e : env) {
    if (absl::StartsWith(e, "NIX_CONFIG=")) e += "\nbuild-users-group =";
  }
  env.push_back(absl::StrCat("XDG_CACHE_HOME=", nix_dir, "/.cache"));
  return env;
}

// `argv` in a mount namespace of its own with `nix_dir` at /nix, the store
// initialised first (two Nix processes creating it at once collide); the
// command replaces the shell (same pid).
std::vector<std::string> InPrivateStore(const std::string& nix_dir, const std::vector<std::string>& argv) {
  std::vector<std::string> wrapped = {"/usr/bin/unshare",
                                      "--mount",
                                      "--propagation",
                                      "private",
                                      "/bin/sh",
                                      "-c",
                                      "mount --bind \"$0\" /nix && nix-store --init && exec \"$@\"",
                                      nix_dir};
  wrapped.insert(wrapped.end(), argv.begin(), argv.end());
  return wrapped;
}

}  // namespace

std::string LocalFarm::HostPathOf(const std::string& store_path, size_t* worker) const {
  if (worker != nullptr) *worker = 0;
  if (!private_stores_ || !absl::StartsWith(store_path, "/nix/")) return store_path;
  for (size_t i = 0; i < worker_daemons_.size(); ++i) {
    const std::string path = StoreDirOf(i) + store_path.substr(std::string("/nix").size());
    std::error_code ec;
    if (fs::symlink_status(path, ec).type() != fs::file_type::not_found && !ec) {
      if (worker != nullptr) *worker = i;
      return path;
    }
  }
  return store_path;  // Nowhere: reading it fails, saying so.
}

ProcessSpec OnPrivateStore(const std::string& nix_dir, const std::vector<std::string>& argv) {
  std::error_code ec;
  fs::create_directories(nix_dir, ec);
  ProcessSpec spec;
  spec.argv = InPrivateStore(nix_dir, argv);
  spec.extra_env = PrivateStoreNixEnv(nix_dir);
  return spec;
}

ProcessSpec LocalFarm::OnWorkerMachine(size_t index, const std::vector<std::string>& argv) const {
  if (private_stores_) return OnPrivateStore(StoreDirOf(index), argv);
  ProcessSpec spec;
  spec.argv = argv;
  spec.extra_env = NixTestEnv();
  return spec;
}

absl::Status LocalFarm::StartCoordinator(const std::string& listen) {
  std::error_code ec;
  fs::remove(dir_.Sub("coordinator.ready"), ec);
  std::vector<std::string> argv = {BinPath("kiln-coordinator"), "--listen=" + listen, "--metrics-listen=127.0.0.1:0",
                                   "--state-dir=" + dir_.Sub("coordinator"),
                                   "--ready-file=" + dir_.Sub("coordinator.ready")};
  argv.insert(argv.end(), coordinator_flags_.begin(), coordinator_flags_.end());
  auto coordinator = Daemon::Start(argv, LogOf("coordinator"), {});
  if (!coordinator.ok()) return coordinator.status();
  coordinator_ = *std::move(coordinator);
  auto ready = WaitForReadyFile(dir_.Sub("coordinator.ready"), LogOf("coordinator"));
  if (!ready.ok()) return ready.status();
  coordinator_address_ = (*ready)["grpc"];
  coordinator_metrics_ = (*ready)["metrics"];
  cache_address_ = ready->value("cache", "");
  return absl::OkStatus();
}

absl::Status LocalFarm::Start() {
  if (absl::Status s = StartCoordinator("127.0.0.1:0"); !s.ok()) return s;
  for (int i = 0; i < workers_; ++i) {
    if (absl::Status s = AddWorker(); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Daemon>> LocalFarm::StartWorker(size_t index, std::string* metrics) {
  const std::string name = absl::StrCat("worker-", index + 1);
  std::error_code ec;
  std::filesystem::remove(dir_.Sub(name + ".ready"), ec);
  std::vector<std::string> argv = {
      BinPath("kiln-worker"),         "--coordinator=" + coordinator_address_,    "--name=" + name,
      "--work-dir=" + dir_.Sub(name), absl::StrCat("--max-jobs=", max_jobs_),     "--metrics-listen=127.0.0.1:0",
      "--nix-option=substituters=",   "--ready-file=" + dir_.Sub(name + ".ready")};
  argv.insert(argv.end(), worker_flags_.begin(), worker_flags_.end());
  std::vector<std::string> env = NixTestEnv();
  env.push_back("XDG_CACHE_HOME=" + dir_.Sub(name + "-cache"));  // See PrivateStoreNixEnv.
  if (private_stores_) {
    const std::string nix_dir = StoreDirOf(index);
    fs::create_directories(nix_dir, ec);
    argv = InPrivateStore(nix_dir, argv);
    env = PrivateStoreNixEnv(nix_dir);
  }
  auto worker = Daemon::Start(argv, LogOf(name), env);
  if (!worker.ok()) return worker.status();
  auto ready = WaitForReadyFile(dir_.Sub(name + ".ready"), LogOf(name));
  if (!ready.ok()) return ready.status();
  *metrics = (*ready)["metrics"].get<std::string>();
  return worker;
}

absl::Status LocalFarm::AddWorker() {
  if (!worker_daemons_.empty() && !private_stores_) {
    // Workers sharing this machine's store would see each other's outputs,
    // which no two real machines do.
    return absl::FailedPreconditionError(
        "a farm of more than one worker gives each its own Nix store: call UsePrivateStores() before Start()");
  }
  std::string metrics;
  auto worker = StartWorker(worker_daemons_.size(), &metrics);
  if (!worker.ok()) return worker.status();
  worker_daemons_.push_back(*std::move(worker));
  worker_metrics_.push_back(metrics);
  return absl::OkStatus();
}

absl::Status LocalFarm::RestartWorker(size_t index) {
  auto worker = StartWorker(index, &worker_metrics_.at(index));
  if (!worker.ok()) return worker.status();
  worker_daemons_.at(index) = *std::move(worker);
  return absl::OkStatus();
}

void LocalFarm::KillCoordinator(int signal) { KillDaemon("coordinator", *coordinator_, signal); }

void LocalFarm::KillWorker(size_t index, int signal) {
  KillDaemon(absl::StrCat("worker-", index + 1), *worker_daemons_.at(index), signal);
}

void LocalFarm::SignalAll(int signal) {
  for (auto& worker : worker_daemons_) {
    if (worker) worker->Kill(signal);
  }
  if (coordinator_) coordinator_->Kill(signal);
}

absl::Status LocalFarm::RestartCoordinator() { return StartCoordinator(coordinator_address_); }

ProcessSpec LocalFarm::KilnSpec(const std::vector<std::string>& args) const {
  ProcessSpec spec;
  // Absolute: a test may run the CLI from another directory.
  spec.argv = {std::filesystem::absolute(BinPath("kiln")).string(), "--coordinator=" + coordinator_address_};
  spec.argv.insert(spec.argv.end(), args.begin(), args.end());
  // The CLI's digest cache stays inside the farm's directory.
  spec.extra_env = {"KILN_CACHE_DIR=" + dir_.Sub("cli-cache")};
  return spec;
}

absl::StatusOr<CommandResult> LocalFarm::Kiln(const std::vector<std::string>& args, absl::Duration timeout) const {
  return RunCommand(KilnSpec(args), "", timeout);
}

BackgroundBuild::BackgroundBuild(const LocalFarm& farm, const std::vector<std::string>& build_args) {
  std::vector<std::string> args = {"build"};
  args.insert(args.end(), build_args.begin(), build_args.end());
  auto id = supervisor_.Spawn(
      farm.KilnSpec(args),
      [this](absl::string_view line) {
        static const std::regex kQueued("queued as job (\\d+)");
        std::string text(line);
        std::smatch m;
        absl::MutexLock lock(&mu_);
        if (stderr_.size() < (1 << 20)) absl::StrAppend(&stderr_, text, "\n");
        if (std::regex_search(text, m, kQueued) && job_id_.empty()) job_id_ = m[1];
      },
      [this](ExitInfo exit, std::string out) {
        exit_ = exit;
        stdout_ = std::move(out);
        done_.Notify();
      });
  spawn_status_ = id.status();
}

std::string BackgroundBuild::WaitForJobId(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  mu_.AwaitWithTimeout(absl::Condition(
                           +[](std::string* id) { return !id->empty(); }, &job_id_),
                       timeout);
  return job_id_;
}

bool BackgroundBuild::WaitDone(absl::Duration timeout) { return done_.WaitForNotificationWithTimeout(timeout); }

std::string BackgroundBuild::stderr_data() {
  absl::MutexLock lock(&mu_);
  return stderr_;
}

absl::StatusOr<std::string> ScrapeMetrics(const std::string& address) {
  auto r =
      RunCommand({.argv = {"curl", "-sSf", absl::StrCat("http://", address, "/metrics")}, .extra_env = {}, .cwd = ""},
                 "", absl::Seconds(30));
  if (!r.ok()) return r.status();
  if (!r->exit.Success()) return absl::UnavailableError(absl::StrCat("curl failed: ", r->stderr_data));
  return r->stdout_data;
}

}  // namespace kiln::testing
