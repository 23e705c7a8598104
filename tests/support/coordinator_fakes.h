// Fakes at the coordinator's stream seams, shared by the owners' unit tests
// and the BuildCoordinator state-machine tests: a worker's stream and a job
// watcher, each recording what it was given.
#pragma once

#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "coordinator/job_journal.h"
#include "coordinator/worker_registry.h"
#include "kiln/v1/builds.pb.h"
#include "kiln/v1/workers.pb.h"

namespace kiln::testing {

// A fake WorkerSession: records what would go on the worker's stream.
class FakeWorkerSession final : public WorkerSession {
 public:
  bool Send(kiln::v1::CoordinatorMessage message) override {
    if (closed) return false;
    sent.push_back(std::move(message));
    return true;
  }
  void Close(absl::Status status) override {
    closed = true;
    close_status = status;
  }
  // Messages of one kind, e.g. Sent(&CoordinatorMessage::has_cancel).
  std::vector<kiln::v1::CoordinatorMessage> Sent(bool (kiln::v1::CoordinatorMessage::*has)() const) const {
    std::vector<kiln::v1::CoordinatorMessage> out;
    for (const auto& m : sent) {
      if ((m.*has)()) out.push_back(m);
    }
    return out;
  }
  // Results acknowledged to this worker (acks ride on other messages).
  int Acks() const {
    int n = 0;
    for (const auto& m : sent) n += m.acks_size();
    return n;
  }
  // One message per assignment (a message may carry several), each with
  // what rides on it (acknowledgements).
  std::vector<kiln::v1::CoordinatorMessage> Assignments() const {
    std::vector<kiln::v1::CoordinatorMessage> out;
    for (const auto& m : sent) {
      if (!m.has_assign()) continue;
      out.push_back(m);
      out.back().clear_assignments();
      for (const auto& more : m.assignments()) out.emplace_back().mutable_assign()->CopyFrom(more);
    }
    return out;
  }
  std::vector<kiln::v1::CoordinatorMessage> sent;
  bool closed = false;
  absl::Status close_status;
};

// A fake JobWatcher: records the events it was given and its close.
class FakeJobWatcher final : public JobWatcher {
 public:
  void OnEvent(const kiln::v1::JobEvent& event) override { events.push_back(event); }
  void Close(absl::Status status) override {
    closed = true;
    close_status = status;
  }
  std::vector<kiln::v1::JobEvent> events;
  bool closed = false;
  absl::Status close_status;
};

}  // namespace kiln::testing
