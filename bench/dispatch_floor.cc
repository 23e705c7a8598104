// kiln-dispatch-floor: a stand-in coordinator for bench/run dispatch, and
// nothing else. It answers the two RPCs the load generator uses
// (BuildService.SubmitBuild, WorkerService.Connect) with the same messages
// kiln-coordinator sends, but keeps nothing: no state store, no events, no
// metrics, no requirements, no leases; queued jobs live in memory and are
// handed to free slots under one lock. What the load generator reaches
// against it is the ceiling that gRPC, this protocol and the machine leave
// to any coordinator: the transport's share of the dispatch target.
//
// --placement chooses how a round's jobs meet the free slots:
//   pack    fill one worker's free slots before the next: as many jobs per
//           message as the slots allow (the best case for batching);
//   spread  each job to the worker its id hashes to, if that one has a free
//           slot, else as pack: jobs scatter over the fleet as they do
//           under locality placement.
#include <algorithm>
#include <cstdio>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "common/grpc_util.h"
#include "common/net.h"
#include "common/outbound_queue.h"
#include "kiln/v1/builds.grpc.pb.h"
#include "kiln/v1/workers.grpc.pb.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:0", "Address to serve on (loopback only for a bench)");
ABSL_FLAG(std::string, ready_file, "", "Written with {\"grpc\": ADDRESS} once serving");
ABSL_FLAG(std::string, placement, "pack", "pack or spread");

namespace kiln {
namespace {

using kiln::v1::CoordinatorMessage;
using kiln::v1::WorkerMessage;

class WorkerStream;

// The whole "scheduler": a FIFO of jobs and the free slots of each worker.
class Floor {
 public:
  explicit Floor(bool spread) : spread_(spread) {}

  // Returns the job ids, in the order of the request's targets.
  std::vector<std::string> Submit(const kiln::v1::SubmitBuildRequest& request) ABSL_LOCKS_EXCLUDED(mu_);
  int AddWorker(WorkerStream* stream, int slots) ABSL_LOCKS_EXCLUDED(mu_);
  void RemoveWorker(int index) ABSL_LOCKS_EXCLUDED(mu_);
  // `done` are the finished jobs' (id, attempt); their slots free, their
  // acknowledgements ride on the worker's next message.
  void Finished(int index, std::vector<std::pair<std::string, uint32_t>> done) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Job {
    std::string id;
    std::shared_ptr<const kiln::v1::SubmitBuildRequest> request;
    int target;
  };
  struct Worker {
    WorkerStream* stream = nullptr;  // Null once gone.
    int free = 0;
    bool listed = false;  // In free_list_.
  };
  // Hands queued jobs to free slots; one message per worker touched, which
  // also carries `acks` for the worker in `acks_for` (-1: none).
  void Dispatch(int acks_for, std::vector<std::pair<std::string, uint32_t>> acks) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int TakeFreeWorker() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ListFree(int index) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const bool spread_;
  absl::Mutex mu_;
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  std::deque<Job> queue_ ABSL_GUARDED_BY(mu_);
  std::vector<Worker> workers_ ABSL_GUARDED_BY(mu_);
  std::vector<int> free_list_ ABSL_GUARDED_BY(mu_);  // A stack; entries may be stale.
};

class WorkerStream final : public grpc::ServerBidiReactor<WorkerMessage, CoordinatorMessage> {
 public:
  explicit WorkerStream(Floor* floor)
      : floor_(floor),
        queue_(1 << 20, {.start_write = [this](const CoordinatorMessage* m) { StartWrite(m); },
                         .finish = [this](grpc::Status s) { Finish(std::move(s)); }}) {
    StartRead(&in_);
  }

  // Called with the Floor's lock held, so a stream is never written after
  // RemoveWorker.
  void Send(CoordinatorMessage message) { queue_.Push(std::move(message), /*force=*/true); }

  void OnReadDone(bool ok) override {
    if (!ok) {
      if (index_ >= 0) floor_->RemoveWorker(index_);
      queue_.Finish(grpc::Status::OK);
      return;
    }
    if (in_.has_register_()) {
      index_ = floor_->AddWorker(this, static_cast<int>(std::max<uint32_t>(1, in_.register_().max_jobs())));
    } else if (index_ >= 0 && (in_.has_finished() || in_.results_size() > 0)) {
      std::vector<std::pair<std::string, uint32_t>> done;
      if (in_.has_finished()) done.emplace_back(in_.finished().job_id(), in_.finished().attempt());
      for (const auto& r : in_.results()) done.emplace_back(r.job_id(), r.attempt());
      floor_->Finished(index_, std::move(done));
    }
    in_.Clear();
    StartRead(&in_);
  }
  void OnWriteDone(bool ok) override { queue_.OnWriteDone(ok); }
  void OnDone() override { delete this; }

 private:
  Floor* const floor_;
  int index_ = -1;
  WorkerMessage in_;
  OutboundQueue<CoordinatorMessage> queue_;
};

std::vector<std::string> Floor::Submit(const kiln::v1::SubmitBuildRequest& request) {
  auto shared = std::make_shared<const kiln::v1::SubmitBuildRequest>(request);
  std::vector<std::string> ids;
  absl::MutexLock lock(&mu_);
  for (int t = 0; t < request.targets_size(); ++t) {
    ids.push_back(absl::StrCat(next_id_++));
    queue_.push_back({ids.back(), shared, t});
  }
  Dispatch(-1, {});
  return ids;
}

int Floor::AddWorker(WorkerStream* stream, int slots) {
  absl::MutexLock lock(&mu_);
  const int index = static_cast<int>(workers_.size());
  workers_.push_back({.stream = stream, .free = slots});
  CoordinatorMessage registered;
  registered.mutable_registered()->set_worker_id(absl::StrCat("floor-", index));
  stream->Send(std::move(registered));
  ListFree(index);
  Dispatch(-1, {});
  return index;
}

void Floor::RemoveWorker(int index) {
  absl::MutexLock lock(&mu_);
  workers_[index].stream = nullptr;
  workers_[index].free = 0;
}

void Floor::Finished(int index, std::vector<std::pair<std::string, uint32_t>> done) {
  absl::MutexLock lock(&mu_);
  if (workers_[index].stream == nullptr) return;
  workers_[index].free += static_cast<int>(done.size());
  ListFree(index);
  Dispatch(index, std::move(done));
}

void Floor::ListFree(int index) {
  Worker& w = workers_[index];
  if (!w.listed && w.stream != nullptr && w.free > 0) {
    w.listed = true;
    free_list_.push_back(index);
  }
}

int Floor::TakeFreeWorker() {
  while (!free_list_.empty()) {
    const int index = free_list_.back();
    Worker& w = workers_[index];
    if (w.stream != nullptr && w.free > 0) return index;
    w.listed = false;
    free_list_.pop_back();
  }
  return -1;
}

void Floor::Dispatch(int acks_for, std::vector<std::pair<std::string, uint32_t>> acks) {
  absl::flat_hash_map<int, CoordinatorMessage> round;
  if (acks_for >= 0) {
    CoordinatorMessage& m = round[acks_for];
    for (auto& [id, attempt] : acks) {
      auto* ack = m.add_acks();
      ack->set_job_id(std::move(id));
      ack->set_attempt(attempt);
    }
  }
  while (!queue_.empty()) {
    const Job& job = queue_.front();
    int index = -1;
    if (spread_ && !workers_.empty()) {
      const int hashed = static_cast<int>(std::hash<std::string>{}(job.id) % workers_.size());
      if (workers_[hashed].stream != nullptr && workers_[hashed].free > 0) index = hashed;
    }
    if (index < 0) index = TakeFreeWorker();
    if (index < 0) break;
    --workers_[index].free;
    CoordinatorMessage& m = round[index];
    // The first assignment of a message goes in `assign`, the rest in
    // `assignments`, as kiln-coordinator sends them.
    kiln::v1::Assignment* a = m.has_assign() ? m.add_assignments() : m.mutable_assign();
    a->set_job_id(job.id);
    a->set_attempt(1);
    *a->mutable_spec() = job.request->targets(job.target).spec();
    for (const auto& blob : job.request->blobs()) *a->add_blobs() = blob;
    queue_.pop_front();
  }
  for (auto& [index, message] : round) workers_[index].stream->Send(std::move(message));
}

class FloorBuildService final : public kiln::v1::BuildService::CallbackService {
 public:
  explicit FloorBuildService(Floor* floor) : floor_(floor) {}
  grpc::ServerUnaryReactor* SubmitBuild(grpc::CallbackServerContext* context,
                                        const kiln::v1::SubmitBuildRequest* request,
                                        kiln::v1::SubmitBuildResponse* response) override {
    for (std::string& id : floor_->Submit(*request)) response->add_job_ids(std::move(id));
    auto* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

 private:
  Floor* const floor_;
};

class FloorWorkerService final : public kiln::v1::WorkerService::CallbackService {
 public:
  explicit FloorWorkerService(Floor* floor) : floor_(floor) {}
  grpc::ServerBidiReactor<WorkerMessage, CoordinatorMessage>* Connect(grpc::CallbackServerContext*) override {
    return new WorkerStream(floor_);
  }

 private:
  Floor* const floor_;
};

int Run() {
  const std::string placement = absl::GetFlag(FLAGS_placement);
  if (placement != "pack" && placement != "spread") {
    std::fprintf(stderr, "error: --placement must be pack or spread, not '%s'\n", placement.c_str());
    return 2;
  }
  const std::string listen = absl::GetFlag(FLAGS_listen);
  absl::StatusOr<HostPort> host_port = ParseHostPort(listen);
  if (!host_port.ok()) {
    std::fprintf(stderr, "error: --listen: %s\n", std::string(host_port.status().message()).c_str());
    return 2;
  }
  Floor floor(placement == "spread");
  FloorBuildService builds(&floor);
  FloorWorkerService workers(&floor);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(listen, grpc::InsecureServerCredentials(), &port);
  builder.SetMaxReceiveMessageSize(kMaxGrpcMessageBytes);
  builder.RegisterService(&builds);
  builder.RegisterService(&workers);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    std::fprintf(stderr, "error: cannot listen on %s\n", listen.c_str());
    return 1;
  }
  const std::string address = FormatHostPort(host_port->host, port);
  if (const std::string ready = absl::GetFlag(FLAGS_ready_file); !ready.empty()) {
    if (absl::Status s = WriteFileAtomically(ready, absl::StrCat("{\"grpc\":\"", address, "\"}\n")); !s.ok()) {
      std::fprintf(stderr, "error: --ready_file: %s\n", std::string(s.message()).c_str());
      return 1;
    }
  }
  std::fprintf(stderr, "kiln-dispatch-floor: %s placement on %s\n", placement.c_str(), address.c_str());
  server->Wait();  // Until killed: a bench helper, stopped by its script.
  return 0;
}

}  // namespace
}  // namespace kiln

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  return kiln::Run();
}
