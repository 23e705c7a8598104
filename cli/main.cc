// kiln: the command line. Parses flags and dispatches to cli/cli.h.
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/time/time.h"
#include "common/cli_args.h"
#include "common/crash_handler.h"
#include "common/image_ref.h"
#include "common/tls.h"
#include "cli/cli.h"

ABSL_FLAG(std::string, coordinator, "", "Coordinator address (default: $KILN_COORDINATOR or 127.0.0.1:7600)");
ABSL_FLAG(std::string, tls_ca, "",
          "The farm's CA (PEM) to verify the coordinator by (default: $KILN_TLS_CA; none: plaintext, loopback only)");
ABSL_FLAG(std::string, tls_cert, "", "A client certificate (PEM) to show the coordinator (optional)");
ABSL_FLAG(std::string, tls_key, "", "Its private key (PEM)");
ABSL_FLAG(bool, json, false, "Print machine-readable JSON on stdout");
ABSL_FLAG(std::string, system, "x86_64-linux", "System to build for");
ABSL_FLAG(bool, quiet, false, "Do not show build logs");
ABSL_FLAG(bool, print_build_logs, false,
          "build: on a terminal, show the full build logs above the status lines (-L; elsewhere they always are)");
ABSL_FLAG(absl::Duration, timeout, absl::ZeroDuration(),
          "Fail a build that runs longer than this, e.g. 30m (default: the coordinator's)");
ABSL_FLAG(absl::Duration, reconnect_timeout, absl::Minutes(2),
          "build, log -f: how long to keep reconnecting to a coordinator that went away before giving up (exit 3)");
ABSL_FLAG(absl::Duration, max_silent_time, absl::ZeroDuration(),
          "Fail a build that prints nothing for this long, e.g. 10m (default: no limit)");
ABSL_FLAG(bool, all_flakes, false,
          "build: every flake.nix in the current git work tree (or directory), as one buildset");
ABSL_FLAG(std::string, attr, "default", "build --all-flakes: the attribute to build of each flake");
ABSL_FLAG(std::string, file, "",
          "build: a JSON file listing targets: {\"targets\": [{\"flake\": \"services/a\", \"attr\": \"oci-image\"}]}");
ABSL_FLAG(std::string, out_link, "",
          "build: download the output here (-o PATH; more targets or outputs add -N / -OUTPUT, as nix build does)");
ABSL_FLAG(bool, rebuild, false, "build: build again even when an identical target's result is cached");
ABSL_FLAG(bool, detach, false, "build: submit, print the job ids and exit without waiting for the builds");
ABSL_FLAG(std::vector<std::string>, label, {},
          "build: only workers with these labels may take the builds (KEY=VALUE, comma-separated)");
ABSL_FLAG(std::string, push, "",
          "build: push the built image to REGISTRY/REPOSITORY[:TAG] (from the worker, straight to the registry)");
ABSL_FLAG(std::vector<std::string>, tag, {}, "build --push: more tags (comma-separated), e.g. testing,$GIT_SHA");
ABSL_FLAG(std::string, manifest_format, "docker", "build --push: docker (v2 schema 2, as skopeo pushes) or oci");
ABSL_FLAG(bool, follow, false, "log: keep printing the log of a running job until it ends (-f)");
ABSL_FLAG(int32_t, limit, 20, "history: how many buildsets to list, newest first");
ABSL_FLAG(bool, write, false, "fod-hash: edit the flake's .nix files where the replacement is unambiguous");
ABSL_FLAG(std::string, name, "", "fod list|export|forget: only FODs of this derivation name");
ABSL_FLAG(std::string, priority, "interactive",
          "Priority class of the builds, by the coordinator's names (default names: interactive, ci, batch)");

namespace {
constexpr char kUsage[] =
    "Kiln: build Nix flakes on a build farm.\n"
    "  kiln [--coordinator=ADDR] build PATH#ATTR... | --all-flakes [--attr=ATTR] | --file=kiln.json\n"
    "                                  [--json] [--quiet] [-L] [--detach] [--rebuild] [-o PATH] [--system=SYSTEM]\n"
    "                                  [--priority=interactive|ci|batch] [--timeout=30m] [--max-silent-time=10m]\n"
    "                                  [--reconnect-timeout=2m]\n"
    "                                  [--label=KEY=VALUE,...] [--push=REGISTRY/REPO[:TAG] [--tag=T,...]]\n"
    "  kiln [--coordinator=ADDR] status JOB|BUILDSET [--json]\n"
    "  kiln [--coordinator=ADDR] cancel JOB|BUILDSET [--json]\n"
    "  kiln [--coordinator=ADDR] log JOB [-f] [--json]\n"
    "  kiln [--coordinator=ADDR] history [--limit=N] [--json]\n"
    "  kiln [--coordinator=ADDR] workers [--json]\n"
    "  kiln [--coordinator=ADDR] workers drain|undrain NAME\n"
    "  kiln [--coordinator=ADDR] fod-hash PATH#ATTR [--write] [--json]\n"
    "  kiln push RESULT REGISTRY/REPO[:TAG] [--tag=T,...] [--authfile=F] [--json]\n"
    "  kiln [--coordinator=ADDR] fod list|export [--name=NAME] | show KEY | forget KEY...|--name=NAME | import FILE\n"
    "Exit codes: 0 success, 1 build failed, 2 bad usage or input, 3 coordinator unreachable,\n"
    "4 the coordinator is out of disk space (it takes work again once space is freed),\n"
    "130 interrupted (Ctrl-C or SIGTERM) and the builds cancelled.";
}

namespace {

// `kiln push …` is kiln-push, installed next to this binary: replaces this
// process with it. Returns false for any other command, true if the exec
// failed (errno says why).
bool ExecPushHelper(int argc, char** argv) {
  int command_at = 1;
  while (command_at < argc && argv[command_at][0] == '-') ++command_at;
  if (command_at >= argc || std::strcmp(argv[command_at], "push") != 0) return false;
  std::string self(argv[0]);
  char exe[4096];
  const ssize_t n = ::readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (n > 0) self.assign(exe, static_cast<size_t>(n));
  const size_t slash = self.rfind('/');
  const std::string helper = slash == std::string::npos ? "kiln-push" : self.substr(0, slash + 1) + "kiln-push";
  std::vector<char*> args = {const_cast<char*>(helper.c_str())};
  for (int i = 1; i < argc; ++i) {
    // The coordinator has no part in a push from here.
    if (i == command_at || std::strncmp(argv[i], "--coordinator", 13) == 0) continue;
    args.push_back(argv[i]);
  }
  args.push_back(nullptr);
  if (slash == std::string::npos) {
    ::execvp(helper.c_str(), args.data());
  } else {
    ::execv(helper.c_str(), args.data());
  }
  return true;
}

// The hand-over happens before this binary's own static initialisers (the
// statically linked gRPC's, protobuf's and Abseil's: ~2.5 ms) have run: a
// constructor of the first priority, to which the C library passes the
// process's arguments. Only libc and libstdc++ (shared, initialised before
// it) are used there. If it did not exec, main tries again and reports.
__attribute__((constructor(101))) void ExecPushHelperEarly(int argc, char** argv, char**) {
  if (argc > 0 && argv != nullptr) static_cast<void>(ExecPushHelper(argc, argv));
}

}  // namespace

int main(int argc, char** argv) {
  if (ExecPushHelper(argc, argv)) {
    std::fprintf(stderr, "error: cannot run kiln-push (next to %s): %s\n", argv[0], std::strerror(errno));
    return kiln::kExitUnavailable;
  }
  kiln::InstallCrashHandler(argv[0]);
  absl::SetProgramUsageMessage(kUsage);
  // `-o PATH`, as nix build spells --out-link.
  std::vector<std::string> expanded(argv, argv + argc);
  for (std::string& a : expanded) {
    if (a == "-o") a = "--out-link";
    if (a == "-L") a = "--print-build-logs";
    if (a == "-f") a = "--follow";
  }
  std::vector<char*> expanded_argv;
  for (std::string& a : expanded) expanded_argv.push_back(a.data());
  argc = static_cast<int>(expanded_argv.size());
  argv = expanded_argv.data();
  kiln::DashedFlagArgs dashed(argc, argv);
  std::vector<char*> positional = absl::ParseCommandLine(dashed.argc(), dashed.argv());
  std::vector<std::string> args(positional.begin() + 1, positional.end());

  kiln::CliOptions options;
  options.coordinator = absl::GetFlag(FLAGS_coordinator);
  if (options.coordinator.empty()) {
    const char* env = std::getenv("KILN_COORDINATOR");
    options.coordinator = env && *env ? env : "127.0.0.1:7600";
  }
  {
    kiln::TlsFiles tls{absl::GetFlag(FLAGS_tls_cert), absl::GetFlag(FLAGS_tls_key), absl::GetFlag(FLAGS_tls_ca)};
    if (const char* env = std::getenv("KILN_TLS_CA"); tls.ca.empty() && env != nullptr && *env) tls.ca = env;
    absl::Status usable = tls.enabled() ? absl::OkStatus() : kiln::CheckPlaintextAllowed("kiln", {options.coordinator});
    absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials =
        usable.ok() ? kiln::MakeChannelCredentials(tls) : usable;
    if (!credentials.ok()) {
      std::fprintf(stderr, "error: %s\n", std::string(credentials.status().message()).c_str());
      return 2;
    }
    options.credentials = *credentials;
    absl::StatusOr<std::string> token = kiln::LoadClientToken();
    if (!token.ok()) {
      std::fprintf(stderr, "error: %s\n", std::string(token.status().message()).c_str());
      return 2;
    }
    options.token = *std::move(token);
  }
  options.json = absl::GetFlag(FLAGS_json);
  options.system = absl::GetFlag(FLAGS_system);
  options.quiet = absl::GetFlag(FLAGS_quiet);
  options.print_build_logs = absl::GetFlag(FLAGS_print_build_logs);
  options.timeout_seconds = absl::ToInt64Seconds(absl::GetFlag(FLAGS_timeout));
  options.watch_retry_seconds =
      static_cast<int>(std::max<int64_t>(1, absl::ToInt64Seconds(absl::GetFlag(FLAGS_reconnect_timeout))));
  options.max_silent_time_seconds = absl::ToInt64Seconds(absl::GetFlag(FLAGS_max_silent_time));
  options.priority = absl::GetFlag(FLAGS_priority);
  options.detach = absl::GetFlag(FLAGS_detach);
  options.rebuild = absl::GetFlag(FLAGS_rebuild);
  options.all_flakes = absl::GetFlag(FLAGS_all_flakes);
  options.attr = absl::GetFlag(FLAGS_attr);
  options.targets_file = absl::GetFlag(FLAGS_file);
  options.out_link = absl::GetFlag(FLAGS_out_link);
  options.push = absl::GetFlag(FLAGS_push);
  options.tags = absl::GetFlag(FLAGS_tag);
  if (absl::GetFlag(FLAGS_manifest_format) != "docker" && absl::GetFlag(FLAGS_manifest_format) != "oci") {
    std::fprintf(stderr, "error: --manifest-format is docker or oci\n");
    return kiln::kExitUsage;
  }
  options.oci_manifest = absl::GetFlag(FLAGS_manifest_format) == "oci";
  if (!options.tags.empty() && options.push.empty()) {
    std::fprintf(stderr, "error: --tag needs --push\n");
    return kiln::kExitUsage;
  }
  // Refused here, before anything is built, by the rules the registry and
  // the coordinator apply.
  if (!options.push.empty()) {
    std::vector<std::string> tags;
    if (absl::Status bad = kiln::ParsePushReference(options.push, options.tags, &tags).status(); !bad.ok()) {
      std::fprintf(stderr, "error: --push: %s\n", std::string(bad.message()).c_str());
      return kiln::kExitUsage;
    }
  }
  absl::StatusOr<std::map<std::string, std::string>> labels = kiln::ParseLabels(absl::GetFlag(FLAGS_label));
  if (!labels.ok()) {
    std::fprintf(stderr, "error: --label: %s\n", std::string(labels.status().message()).c_str());
    return kiln::kExitUsage;
  }
  options.labels = *std::move(labels);

  if (args.empty()) {
    std::fprintf(stderr, "%s\n", kUsage);
    return kiln::kExitUsage;
  }
  const std::string command = args[0];
  args.erase(args.begin());
  // Ids and worker names are short printable text: anything else is refused
  // here, with a message, rather than echoed or sent (a huge one would not
  // even fit in a request's headers).
  if (command == "status" || command == "cancel" || command == "log" || command == "workers") {
    for (const std::string& arg : args) {
      if (command == "workers" && (arg == "drain" || arg == "undrain")) continue;
      if (absl::Status s = kiln::CheckPrintableName(command == "workers" ? "worker name" : "id", arg, 128); !s.ok()) {
        std::fprintf(stderr, "error: %s\n", std::string(s.message()).c_str());
        std::_Exit(kiln::kExitUsage);
      }
    }
  }
  int code = kiln::kExitUsage;
  if (command == "build") {
    code = kiln::RunBuildCommand(options, args);
  } else if (command == "fod-hash") {
    code = kiln::RunFodHashCommand(options, args, absl::GetFlag(FLAGS_write));
  } else if (command == "fod") {
    code = kiln::RunFodCommand(options, args, absl::GetFlag(FLAGS_name));
  } else if (command == "workers") {
    code = kiln::RunWorkersCommand(options, args);
  } else if (command == "log" && args.size() == 1) {
    code = kiln::RunLogCommand(options, args[0], absl::GetFlag(FLAGS_follow));
  } else if (command == "history" && args.empty()) {
    code = kiln::RunHistoryCommand(options, absl::GetFlag(FLAGS_limit));
  } else if ((command == "status" || command == "cancel") && args.size() == 1) {
    code = command == "status" ? kiln::RunStatusCommand(options, args[0]) : kiln::RunCancelCommand(options, args[0]);
  } else {
    std::fprintf(stderr, "error: unknown command or wrong arguments: '%s'\n%s\n",
                 kiln::TerminalSafe(command.substr(0, 100), false).c_str(), kUsage);
  }
  // Everything the user sees is written; skip static destructors (gRPC's
  // shutdown) that only delay the exit of every command.
  std::fflush(stdout);
  std::fflush(stderr);
  std::_Exit(code);
}
