// Load generator for bench/run dispatch: drives a real kiln-coordinator over
// loopback gRPC with simulated workers whose builds finish at once (a fake
// executor: the scheduler, the state store and the RPC layer are what is
// measured, not Nix).
//
// Modes:
//   throughput  N workers; M jobs submitted in batches as fast as accepted;
//               ends when every result is acknowledged. Prints jobs_per_s.
//   latency     N workers; jobs submitted one per request at --rate jobs/s
//               (open loop: requests do not wait for earlier answers);
//               prints submit-to-assignment latency percentiles.
//   fill        no workers; submits M jobs and exits (queued-job memory).
// Every loop is bounded by --jobs and --max_time.
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/cleanup/cleanup.h"
#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "common/grpc_util.h"
#include "common/outbound_queue.h"
#include "common/source_tree.h"
#include "kiln/v1/builds.grpc.pb.h"
#include "kiln/v1/workers.grpc.pb.h"

ABSL_FLAG(std::string, coordinator, "127.0.0.1:7600", "Coordinator address");
ABSL_FLAG(std::string, mode, "throughput", "throughput, latency or fill");
ABSL_FLAG(int, workers, 1000, "Simulated workers");
ABSL_FLAG(int, slots, 4, "Build slots per worker");
ABSL_FLAG(int, jobs, 100000, "Jobs to submit");
ABSL_FLAG(int, batch, 1000, "Targets per SubmitBuild (throughput and fill)");
ABSL_FLAG(double, rate, 1000, "Jobs per second (latency mode)");
ABSL_FLAG(int, channels, 8, "gRPC connections the workers share");
ABSL_FLAG(absl::Duration, max_time, absl::Seconds(120), "Give up after this long");

namespace kiln {
namespace {

using kiln::v1::CoordinatorMessage;
using kiln::v1::WorkerMessage;

int64_t NowNanos() { return absl::GetCurrentTimeNanos(); }

// Per job id (ids are 1, 2, 3, … on a fresh coordinator): when it was
// submitted and when a worker got it, in ns; 0 = not yet.
struct Timeline {
  explicit Timeline(size_t n) : submitted(n + 1), assigned(n + 1) {}
  std::vector<std::atomic<int64_t>> submitted;
  std::vector<std::atomic<int64_t>> assigned;
  void Mark(std::vector<std::atomic<int64_t>>& v, const std::string& id, int64_t t) {
    uint64_t i = 0;
    if (absl::SimpleAtoi(id, &i) && i < v.size()) v[i].store(t, std::memory_order_relaxed);
  }
};

// What the simulated workers saw, summed over all of them.
struct Counters {
  std::atomic<int64_t> acked{0};
  std::atomic<int> registered{0};
  std::atomic<int64_t> assign_messages{0};  // Messages carrying assignments.
  std::atomic<int64_t> assignments{0};
};

class FakeWorker final : public grpc::ClientBidiReactor<WorkerMessage, CoordinatorMessage> {
 public:
  FakeWorker(kiln::v1::WorkerService::Stub* stub, std::string name, int slots, Timeline* timeline, Counters* counters)
      : timeline_(timeline),
        counters_(counters),
        queue_(1 << 20, {.start_write = [this](const WorkerMessage* m) { StartWrite(m); },
                         .finish =
                             [this](grpc::Status) {
                               StartWritesDone();
                               RemoveHold();
                             }}) {
    WorkerMessage reg;
    reg.mutable_register_()->set_name(std::move(name));
    reg.mutable_register_()->add_systems("x86_64-linux");
    reg.mutable_register_()->set_max_jobs(static_cast<uint32_t>(slots));
    stub->async()->Connect(&context_, this);
    AddHold();
    queue_.Push(std::move(reg), /*force=*/true);
    StartRead(&incoming_);
    StartCall();
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      queue_.Finish(grpc::Status::OK);
      return;
    }
    switch (incoming_.kind_case()) {
      case CoordinatorMessage::kRegistered: counters_->registered.fetch_add(1); break;
      case CoordinatorMessage::kAssign: {
        // The fake executor: every build succeeds at once; the results of
        // one message's assignments go back in one message.
        WorkerMessage done;
        Finish(incoming_.assign(), *done.mutable_finished());
        for (const auto& a : incoming_.assignments()) Finish(a, *done.add_results());
        queue_.Push(std::move(done), /*force=*/true);
        counters_->assign_messages.fetch_add(1, std::memory_order_relaxed);
        counters_->assignments.fetch_add(1 + incoming_.assignments_size(), std::memory_order_relaxed);
        break;
      }
      case CoordinatorMessage::kResultAck: counters_->acked.fetch_add(1, std::memory_order_relaxed); break;
      default: break;
    }
    if (!incoming_.acks().empty()) counters_->acked.fetch_add(incoming_.acks_size(), std::memory_order_relaxed);
    incoming_.Clear();
    StartRead(&incoming_);
  }
  void OnWriteDone(bool ok) override { queue_.OnWriteDone(ok); }
  void OnDone(const grpc::Status&) override { done_.Notify(); }

  void Finish(const kiln::v1::Assignment& a, kiln::v1::JobFinished& out) {
    timeline_->Mark(timeline_->assigned, a.job_id(), NowNanos());
    out.set_job_id(a.job_id());
    out.set_attempt(a.attempt());
    out.mutable_result()->set_code(kiln::v1::RESULT_CODE_SUCCEEDED);
    (*out.mutable_result()->mutable_outputs())["out"] = "/nix/store/fake-out";
  }

  void Stop() {
    context_.TryCancel();
    done_.WaitForNotification();
  }

 private:
  Timeline* const timeline_;
  Counters* const counters_;
  grpc::ClientContext context_;
  CoordinatorMessage incoming_;
  OutboundQueue<WorkerMessage> queue_;
  absl::Notification done_;
};

// A one-file flake tree, shared by every job (jobs differ by attribute).
struct Source {
  kiln::v1::Digest root;
  std::vector<kiln::v1::Blob> blobs;
};

Source MakeSource() {
  const std::string flake = "{ outputs = _: { }; }\n";
  kiln::v1::Directory dir;
  auto* f = dir.add_files();
  f->set_name("flake.nix");
  *f->mutable_digest() = DigestOf(flake);
  const std::string dir_blob = SerializeDirectory(dir);
  Source s;
  s.root = DigestOf(dir_blob);
  for (const std::string& data : {flake, dir_blob}) {
    kiln::v1::Blob b;
    *b.mutable_digest() = DigestOf(data);
    b.set_data(data);
    s.blobs.push_back(std::move(b));
  }
  return s;
}

kiln::v1::SubmitBuildRequest MakeRequest(const Source& source, int first, int count) {
  kiln::v1::SubmitBuildRequest request;
  request.set_submitter("bench");
  for (const auto& b : source.blobs) *request.add_blobs() = b;
  for (int i = first; i < first + count; ++i) {
    auto* spec = request.add_targets()->mutable_spec();
    *spec->mutable_source()->mutable_tree_root() = source.root;
    spec->set_attr(absl::StrCat("pkg", i));  // Distinct: nothing is deduplicated.
    spec->mutable_requirements()->set_system("x86_64-linux");
    spec->set_priority(kiln::v1::PRIORITY_CI);
  }
  return request;
}

int64_t Percentile(std::vector<int64_t> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t i = static_cast<size_t>(p * static_cast<double>(v.size() - 1) + 0.5);
  return v[std::min(i, v.size() - 1)];
}

int Run() {
  const std::string mode = absl::GetFlag(FLAGS_mode);
  const int jobs = absl::GetFlag(FLAGS_jobs);
  const int workers = mode == "fill" ? 0 : absl::GetFlag(FLAGS_workers);
  const absl::Time give_up = absl::Now() + absl::GetFlag(FLAGS_max_time);
  const std::string address = absl::GetFlag(FLAGS_coordinator);

  auto build_stub = kiln::v1::BuildService::NewStub(MakeChannel(address));
  std::vector<std::unique_ptr<kiln::v1::WorkerService::Stub>> worker_stubs;
  for (int c = 0; c < absl::GetFlag(FLAGS_channels); ++c) {
    // A distinct argument per channel: separate connections, not one shared.
    grpc::ChannelArguments args;
    args.SetInt("kiln.bench.channel", c);
    args.SetMaxReceiveMessageSize(kMaxGrpcMessageBytes);
    worker_stubs.push_back(
        kiln::v1::WorkerService::NewStub(grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args)));
  }

  Timeline timeline(static_cast<size_t>(jobs));
  Counters counters;
  std::atomic<int64_t>& acked = counters.acked;
  std::atomic<int>& registered = counters.registered;
  std::vector<std::unique_ptr<FakeWorker>> fleet;
  for (int w = 0; w < workers; ++w) {
    fleet.push_back(std::make_unique<FakeWorker>(worker_stubs[w % worker_stubs.size()].get(), absl::StrCat("bench-", w),
                                                 absl::GetFlag(FLAGS_slots), &timeline, &counters));
  }
  // Every way out of here ends the streams first: a reactor must not be
  // destroyed while its call is live.
  auto stop_fleet = absl::MakeCleanup([&fleet] {
    for (auto& w : fleet) w->Stop();
  });
  while (registered.load() < workers && absl::Now() < give_up) absl::SleepFor(absl::Milliseconds(5));
  if (registered.load() < workers) {
    std::fprintf(stderr, "only %d of %d workers registered\n", registered.load(), workers);
    return 1;
  }

  // Requests are built before the clock starts: the load generator shares
  // the machine, and building them is not the coordinator's work.
  const Source source = MakeSource();
  const int batch = mode == "latency" ? 1 : std::max(1, absl::GetFlag(FLAGS_batch));
  std::vector<kiln::v1::SubmitBuildRequest> requests;
  for (int first = 0; first < jobs; first += batch) {
    requests.push_back(MakeRequest(source, first, std::min(batch, jobs - first)));
  }
  const int64_t start = NowNanos();
  int submitted = 0;
  const double rate = absl::GetFlag(FLAGS_rate);
  if (mode == "latency") {
    // Open loop: request i leaves at start + i/rate whether or not the
    // earlier ones were answered. (One blocking request at a time would
    // submit at the pace of the round trip, far below the rate asked for.)
    struct Call {
      grpc::ClientContext context;
      kiln::v1::SubmitBuildResponse response;
      int64_t sent = 0;
    };
    std::vector<std::unique_ptr<Call>> calls;
    absl::Mutex mu;
    int answered = 0;   // Guarded by mu.
    std::string error;  // Guarded by mu: the first failure.
    for (size_t i = 0; i < requests.size() && absl::Now() < give_up; ++i) {
      const int64_t due = start + static_cast<int64_t>(1e9 * static_cast<double>(i) / rate);
      if (const int64_t wait = due - NowNanos(); wait > 0) absl::SleepFor(absl::Nanoseconds(wait));
      Call* call = calls.emplace_back(std::make_unique<Call>()).get();
      call->sent = NowNanos();
      build_stub->async()->SubmitBuild(&call->context, &requests[i], &call->response, [&, call](grpc::Status status) {
        for (const auto& id : call->response.job_ids()) {
          timeline.Mark(timeline.submitted, id, call->sent);
        }
        absl::MutexLock lock(&mu);
        if (!status.ok() && error.empty()) error = status.error_message();
        ++answered;
      });
      submitted += requests[i].targets_size();
    }
    // Every callback has run before `calls` goes (bounded: the calls'
    // contexts are cancelled at the deadline).
    auto all_answered = [&] { return answered == static_cast<int>(calls.size()); };
    {
      absl::MutexLock lock(&mu);
      if (!mu.AwaitWithDeadline(absl::Condition(&all_answered), give_up)) {
        for (auto& call : calls) call->context.TryCancel();
        mu.Await(absl::Condition(&all_answered));
      }
    }
    if (!error.empty()) {
      std::fprintf(stderr, "SubmitBuild: %s\n", error.c_str());
      return 1;
    }
  } else {
    for (const kiln::v1::SubmitBuildRequest& request : requests) {
      if (absl::Now() >= give_up) break;
      kiln::v1::SubmitBuildResponse response;
      grpc::ClientContext context;
      const int64_t t = NowNanos();
      grpc::Status status = build_stub->SubmitBuild(&context, request, &response);
      if (!status.ok()) {
        std::fprintf(stderr, "SubmitBuild: %s\n", status.error_message().c_str());
        return 1;
      }
      for (const auto& id : response.job_ids()) timeline.Mark(timeline.submitted, id, t);
      submitted += request.targets_size();
    }
  }
  const int64_t submit_end = NowNanos();
  if (mode != "fill") {
    while (acked.load() < submitted && absl::Now() < give_up) absl::SleepFor(absl::Microseconds(200));
  }
  const int64_t end = NowNanos();
  const double seconds = static_cast<double>(end - start) / 1e9;

  std::printf("jobs=%d\n", submitted);
  std::printf("workers=%d\n", workers);
  std::printf("submit_seconds=%.3f\n", static_cast<double>(submit_end - start) / 1e9);
  if (mode != "fill") {
    std::printf("completed=%lld\n", static_cast<long long>(acked.load()));
    std::printf("seconds=%.3f\n", seconds);
    std::printf("jobs_per_s=%.0f\n", static_cast<double>(acked.load()) / seconds);
    std::printf("assignments_per_message=%.2f\n",
                static_cast<double>(counters.assignments.load()) /
                    static_cast<double>(std::max<int64_t>(1, counters.assign_messages.load())));
    std::vector<int64_t> latency;
    for (size_t i = 1; i < timeline.submitted.size(); ++i) {
      const int64_t s = timeline.submitted[i].load(), a = timeline.assigned[i].load();
      if (s > 0 && a > 0) latency.push_back(std::max<int64_t>(0, a - s));
    }
    std::printf("assign_latency_p50_us=%.0f\n", static_cast<double>(Percentile(latency, 0.5)) / 1e3);
    std::printf("assign_latency_p99_us=%.0f\n", static_cast<double>(Percentile(latency, 0.99)) / 1e3);
    std::printf("assign_latency_max_us=%.0f\n", static_cast<double>(Percentile(latency, 1.0)) / 1e3);
  }
  std::fflush(stdout);
  return acked.load() < submitted && mode != "fill" ? 1 : 0;
}

}  // namespace
}  // namespace kiln

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  // As in the daemons: no lock-order checking on every Mutex acquisition.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  return kiln::Run();
}
