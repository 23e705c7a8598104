// WorkerRegistry: the workers' side of the coordinator — their streams
// (sessions), registration and the reconnect rules, leases, drains, the
// admission limits read from heartbeats, and the messages waiting to go to
// each worker (its outbox, delivered after the state write they announce).
//
// It decides and returns; it does not touch the job table or the scheduler.
// The coordinator applies its answers (a refused Register, a departure with
// a lease, leases that ran out) to both.
//
// Not thread-safe: the coordinator's strand calls it.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/time/time.h"
#include "common/clock.h"
#include "coordinator/scheduler.h"
#include "kiln/v1/workers.pb.h"

namespace kiln {

// The coordinator's end of one worker's stream.
class WorkerSession {
 public:
  virtual ~WorkerSession() = default;
  // Queues a message for the worker; false when the stream is closing or its
  // queue is full (the stream is then closed and the worker reconnects).
  virtual bool Send(kiln::v1::CoordinatorMessage message) = 0;
  // Ends the stream with `status`. Idempotent.
  virtual void Close(absl::Status status) = 0;
};

struct WorkerRegistryOptions {
  absl::Duration heartbeat_interval = absl::Seconds(10);
  // How long a worker's jobs are held after its stream breaks or it falls
  // silent, before they are requeued.
  absl::Duration lease = absl::Seconds(60);
  uint32_t max_worker_jobs = 1024;  // Sanity bound on a worker's slots.
  // Admission limits (0 disables one): a worker past one takes no new job.
  int64_t min_store_free_bytes = int64_t{1} << 30;
  int64_t min_work_dir_free_bytes = int64_t{512} << 20;
  double max_memory_used_fraction = 0.95;
  double max_load_per_slot = 0;
};

class WorkerRegistry {
 public:
  struct Worker {
    std::shared_ptr<WorkerSession> session;
    std::string name;         // Empty until registered.
    std::string instance_id;  // Its process's, from Register (may be empty).
    absl::Time last_seen;
    kiln::v1::Heartbeat last_heartbeat;
    // Messages waiting for DeliverOutboxes, in order.
    std::vector<kiln::v1::CoordinatorMessage> outbox;
  };

  // What Register decided.
  struct Admission {
    absl::Status refused;                     // Not OK: close the new stream with it.
    const WorkerSession* replaces = nullptr;  // An older stream of the same worker, to end first.
  };

  // A registered worker's stream ended.
  struct Departure {
    std::string name;
    absl::Time lease_until;   // Its jobs are held until then.
    bool lease_over = false;  // Already (a zero lease, or a silent worker's).
  };

  WorkerRegistry(const Clock* clock, WorkerRegistryOptions options);

  // A message arrived on `session`: its entry (created for a new stream),
  // seen now.
  Worker& Seen(const std::shared_ptr<WorkerSession>& session);
  Worker* Find(const WorkerSession* session);
  const Worker* Find(const WorkerSession* session) const;
  // The connected worker of that name, or null.
  Worker* ByName(const std::string& name);
  const Worker* ByName(const std::string& name) const;

  // Whether `reg` may register on `worker`'s stream. A second process under
  // the name of a live worker is refused; the same process (its instance
  // id) or a stream silent for two heartbeats is replaced.
  Admission CheckRegister(const Worker& worker, const kiln::v1::Register& reg) const;
  // Binds the name to the stream (after CheckRegister and the end of any
  // stream it replaces); the worker's lease, if any, ends.
  void Bind(Worker& worker, const kiln::v1::Register& reg);
  static WorkerCapabilities CapabilitiesOf(const kiln::v1::Register& reg);
  // The reply to an accepted Register.
  kiln::v1::CoordinatorMessage Registered(const Worker& worker) const;
  // The interval workers are told to send heartbeats at: the configured
  // one, or a third of the lease when that is shorter.
  absl::Duration HeartbeatInterval() const;

  // Records a heartbeat; returns why the worker should take no new job ("":
  // within every limit). `slots`: its job slots, for the load limit.
  std::string Heartbeat(Worker& worker, const kiln::v1::Heartbeat& heartbeat, int slots);

  // The stream is gone. A registered worker departs (its lease starts from
  // its last message); an older stream of a replaced one does not.
  std::optional<Departure> Gone(const WorkerSession* session);

  // Registered streams with no message for a lease (a dead peer behind a
  // half-open connection): the caller closes them and calls Gone.
  std::vector<const WorkerSession*> Silent() const;
  // Workers whose lease ran out, by name; each then EndLease.
  std::vector<std::string> ExpiredLeases() const;
  void EndLease(const std::string& name) { lease_until_.erase(name); }
  // Holds a worker's jobs for one lease (after a restart, until it is back).
  void Hold(const std::string& name) { lease_until_.try_emplace(name, clock_->Now() + options_.lease); }
  std::optional<absl::Time> lease_until(const std::string& name) const;
  std::string LeaseExpiredReason() const;

  // Drain, kept across a worker's reconnects.
  void SetDrained(const std::string& name, bool drained);
  bool drained(const std::string& name) const { return drained_.contains(name); }

  // The outbox: messages wait for DeliverOutboxes. Assignments join the
  // last message when they can; acknowledgements ride on the next one.
  void Send(Worker& worker, kiln::v1::CoordinatorMessage message);
  void Assign(Worker& worker, kiln::v1::Assignment assignment);
  void Ack(Worker& worker, const std::string& job_id, uint32_t attempt);
  // Sends every waiting message (after the write that they announce).
  void DeliverOutboxes();

  void CloseAll(const absl::Status& status);

 private:
  const Clock* const clock_;
  const WorkerRegistryOptions options_;
  absl::flat_hash_map<const WorkerSession*, Worker> sessions_;
  // Invariant: every session here has an entry in sessions_.
  absl::flat_hash_map<std::string, const WorkerSession*> session_by_name_;
  // Workers whose stream is gone but whose jobs are held, until when.
  absl::flat_hash_map<std::string, absl::Time> lease_until_;
  absl::flat_hash_set<std::string> drained_;
  std::vector<const WorkerSession*> with_outbox_;
};

}  // namespace kiln
