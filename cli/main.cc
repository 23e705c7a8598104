// kiln: the command line. Parses flags and dispatches to cli/cli.h.
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "common/cli_args.h"
#include "common/command_line.h"
#include "common/crash_handler.h"
#include "common/image_ref.h"
#include "common/tls.h"
#include "cli/cli.h"
#include "cli/completion.h"

namespace {
constexpr char kUsage[] =
    "Kiln: build Nix flakes on a build farm.\n"
    "  kiln [--coordinator=ADDR] build PATH#ATTR... | --all-flakes [--attr=ATTR] | --file=kiln.json\n"
    "                                  [--json] [--quiet] [-L] [--detach] [--rebuild] [-o PATH] [--system=SYSTEM]\n"
    "                                  [--out-link-mode=auto|store|files]\n"
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
    "  kiln [--coordinator=ADDR] copy /nix/store/PATH... [--json]\n"
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
  // Options per command: a flag of another command is refused, by name.
  CLI::App app(kUsage, "kiln");
  kiln::UseKilnConventions(app);
  app.require_subcommand(1);
  std::string coordinator, tls_ca, tls_cert, tls_key;
  app.add_option("--coordinator", coordinator, "Coordinator address (default: $KILN_COORDINATOR or 127.0.0.1:7600)");
  app.add_option("--tls-ca", tls_ca,
                 "The farm's CA (PEM) to verify the coordinator by (default: $KILN_TLS_CA; none: plaintext, loopback "
                 "only)");
  app.add_option("--tls-cert", tls_cert, "A client certificate (PEM) to show the coordinator (optional)");
  app.add_option("--tls-key", tls_key, "Its private key (PEM)");

  kiln::CliOptions options;
  std::vector<std::string> args;  // The command's positional arguments.
  absl::Duration timeout = absl::ZeroDuration(), reconnect_timeout = absl::Minutes(2),
                 max_silent_time = absl::ZeroDuration();
  std::vector<std::string> labels;
  std::string manifest_format = "docker";
  bool follow = false, write = false;
  int limit = 20;
  std::string fod_name;
  const auto add_command = [&](const std::string& name, const std::string& help) {
    CLI::App* c = app.add_subcommand(name, help);
    c->fallthrough();  // The coordinator's options may come after the command too.
    c->add_flag("--json", options.json, "Print machine-readable JSON on stdout");
    return c;
  };
  CLI::App* build = add_command("build", "Build flakes on the farm: PATH#ATTR..., --all-flakes or --file");
  build->add_option("INSTALLABLE", args, "PATH#ATTR (PATH: a flake directory; ATTR: default if left out)");
  build->add_option("--system", options.system, "System to build for")->capture_default_str();
  build->add_flag("--quiet", options.quiet, "Do not show build logs");
  build->add_flag("-L,--print-build-logs", options.print_build_logs,
                  "On a terminal, show the full build logs above the status lines (elsewhere they always are)");
  kiln::AddDurationOption(*build, "--timeout", &timeout,
                          "Fail a build that runs longer than this, e.g. 30m (default: the coordinator's)");
  kiln::AddDurationOption(*build, "--reconnect-timeout", &reconnect_timeout,
                          "How long to keep reconnecting to a coordinator that went away before giving up (exit 3)");
  kiln::AddDurationOption(*build, "--max-silent-time", &max_silent_time,
                          "Fail a build that prints nothing for this long, e.g. 10m (default: no limit)");
  build->add_flag("--all-flakes", options.all_flakes,
                  "Every flake.nix in the current git work tree (or directory), as one buildset");
  build->add_option("--attr", options.attr, "With --all-flakes: the attribute to build of each flake")
      ->capture_default_str();
  build->add_option("--file", options.targets_file,
                    "A JSON file listing targets: {\"targets\": [{\"flake\": \"services/a\", \"attr\": "
                    "\"oci-image\"}]}");
  build->add_option("-o,--out-link", options.out_link,
                    "The output here: a GC-root symlink into the local Nix store, fetched from the farm store (more "
                    "targets or outputs add -N / -OUTPUT, as nix build does)");
  build
      ->add_option("--out-link-mode", options.out_link_mode,
                   "store: -o realises the outputs in the local Nix store; files: downloads their files (no Nix "
                   "needed); auto: store when this machine has a Nix store")
      ->check(CLI::IsMember({"auto", "store", "files"}))
      ->capture_default_str();
  build->add_flag("--rebuild", options.rebuild, "Build again even when an identical target's result is cached");
  build->add_flag("--detach", options.detach, "Submit, print the job ids and exit without waiting for the builds");
  kiln::AddListOption(*build, "--label", &labels,
                      "Only workers with these labels may take the builds (KEY=VALUE, comma-separated)");
  build->add_option("--push", options.push,
                    "Push the built image to REGISTRY/REPOSITORY[:TAG] (from the worker, straight to the registry)");
  kiln::AddListOption(*build, "--tag", &options.tags,
                      "With --push: more tags (comma-separated), e.g. testing,$GIT_SHA");
  build->add_option("--manifest-format", manifest_format, "With --push: docker (v2 schema 2, as skopeo pushes) or oci")
      ->check(CLI::IsMember({"docker", "oci"}))
      ->capture_default_str();
  build
      ->add_option("--priority", options.priority,
                   "Priority class of the builds, by the coordinator's names (default names: interactive, ci, batch)")
      ->capture_default_str();
  CLI::App* status = add_command("status", "A job's or a buildset's state");
  status->add_option("ID", args, "JOB or BUILDSET (b…)")->required()->expected(1);
  CLI::App* cancel = add_command("cancel", "Cancel a job or every job of a buildset");
  cancel->add_option("ID", args, "JOB or BUILDSET (b…)")->required()->expected(1);
  CLI::App* log = add_command("log", "A job's build log");
  log->add_option("JOB", args, "The job")->required()->expected(1);
  log->add_flag("-f,--follow", follow, "Keep printing the log of a running job until it ends");
  kiln::AddDurationOption(*log, "--reconnect-timeout", &reconnect_timeout,
                          "With -f: how long to keep reconnecting to a coordinator that went away (exit 3)");
  CLI::App* history = add_command("history", "The most recent buildsets, newest first");
  history->add_option("--limit", limit, "How many buildsets to list")->capture_default_str();
  CLI::App* workers = add_command("workers", "The farm's workers; drain|undrain NAME");
  workers->add_option("ARGS", args, "drain NAME | undrain NAME");
  CLI::App* fod_hash = add_command("fod-hash", "The right hashes of a flake's fixed-output derivations");
  fod_hash->add_option("INSTALLABLE", args, "PATH#ATTR")->required();
  fod_hash->add_flag("--write", write, "Edit the flake's .nix files where the replacement is unambiguous");
  fod_hash->add_flag("--quiet", options.quiet, "Do not show build logs");
  CLI::App* fod =
      add_command("fod", "The FOD cache: list|export [--name=NAME] | show KEY | forget KEY...|--name | import");
  fod->add_option("ARGS", args, "list | export | show KEY | forget KEY... | import FILE")->required();
  fod->add_option("--name", fod_name, "list|export|forget: only FODs of this derivation name");
  CLI::App* copy =
      add_command("copy", "Fetch store paths and their closures from the farm store into the local Nix store");
  copy->add_option("PATH", args, "/nix/store/HASH-NAME")->required();
  std::string token_file;
  CLI::App* serve_nix = app.add_subcommand(
      "serve-nix",
      "Speak Nix's serve protocol (nix-store --serve) on stdin/stdout over the farm store: an SSH forced command");
  serve_nix->fallthrough();
  serve_nix
      ->add_option("--priority", options.priority,
                   "Priority class of the derivations clients send (the coordinator's names: interactive, ci, batch)")
      ->capture_default_str();
  serve_nix->add_option("--token-file", token_file,
                        "The token to show the coordinator (a file only its owner can read; default: $KILN_TOKEN or "
                        "~/.config/kiln/token)");
  std::string shell;
  CLI::App* completion = app.add_subcommand("completion", "Print a shell completion script: bash, zsh or fish");
  completion->add_option("SHELL", shell, "bash, zsh or fish")
      ->required()
      ->check(CLI::IsMember({"bash", "zsh", "fish"}));
  if (std::optional<int> exit = kiln::ParseCommandLine(app, argc, argv)) return *exit;
  if (completion->parsed()) {
    std::fputs(kiln::CompletionScript(app, shell).c_str(), stdout);
    return kiln::kExitOk;
  }
  const std::string command_name = app.get_subcommands().front()->get_name();

  options.coordinator = coordinator;
  if (options.coordinator.empty()) {
    const char* env = std::getenv("KILN_COORDINATOR");
    options.coordinator = env && *env ? env : "127.0.0.1:7600";
  }
  {
    kiln::TlsFiles tls{tls_cert, tls_key, tls_ca};
    if (const char* env = std::getenv("KILN_TLS_CA"); tls.ca.empty() && env != nullptr && *env) tls.ca = env;
    absl::Status usable = tls.enabled() ? absl::OkStatus() : kiln::CheckPlaintextAllowed("kiln", {options.coordinator});
    absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials =
        usable.ok() ? kiln::MakeChannelCredentials(tls) : usable;
    if (!credentials.ok()) {
      std::fprintf(stderr, "error: %s\n", std::string(credentials.status().message()).c_str());
      return 2;
    }
    options.credentials = *credentials;
    absl::StatusOr<std::string> token =
        token_file.empty() ? kiln::LoadClientToken() : kiln::ReadPrivateTokenFile(token_file);
    if (!token.ok()) {
      std::fprintf(stderr, "error: %s\n", std::string(token.status().message()).c_str());
      return 2;
    }
    options.token = *std::move(token);
  }
  options.timeout_seconds = absl::ToInt64Seconds(timeout);
  options.watch_retry_seconds = static_cast<int>(std::max<int64_t>(1, absl::ToInt64Seconds(reconnect_timeout)));
  options.max_silent_time_seconds = absl::ToInt64Seconds(max_silent_time);
  options.oci_manifest = manifest_format == "oci";
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
  absl::StatusOr<std::map<std::string, std::string>> parsed_labels = kiln::ParseLabels(labels);
  if (!parsed_labels.ok()) {
    std::fprintf(stderr, "error: --label: %s\n", std::string(parsed_labels.status().message()).c_str());
    return kiln::kExitUsage;
  }
  options.labels = *std::move(parsed_labels);

  const std::string& command = command_name;
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
    code = kiln::RunFodHashCommand(options, args, write);
  } else if (command == "fod") {
    code = kiln::RunFodCommand(options, args, fod_name);
  } else if (command == "workers") {
    code = kiln::RunWorkersCommand(options, args);
  } else if (command == "serve-nix") {
    code = kiln::RunServeNixCommand(options);
  } else if (command == "copy") {
    code = kiln::RunCopyCommand(options, args);
  } else if (command == "log" && args.size() == 1) {
    code = kiln::RunLogCommand(options, args[0], follow);
  } else if (command == "history" && args.empty()) {
    code = kiln::RunHistoryCommand(options, limit);
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
