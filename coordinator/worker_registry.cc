#include "coordinator/worker_registry.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/grpc_util.h"

namespace kiln {

WorkerRegistry::WorkerRegistry(const Clock* clock, WorkerRegistryOptions options) : clock_(clock), options_(options) {}

WorkerRegistry::Worker& WorkerRegistry::Seen(const std::shared_ptr<WorkerSession>& session) {
  auto [it, inserted] = sessions_.try_emplace(session.get());
  if (inserted) it->second.session = session;
  it->second.last_seen = clock_->Now();
  return it->second;
}

WorkerRegistry::Worker* WorkerRegistry::Find(const WorkerSession* session) {
  auto it = sessions_.find(session);
  return it == sessions_.end() ? nullptr : &it->second;
}

const WorkerRegistry::Worker* WorkerRegistry::Find(const WorkerSession* session) const {
  auto it = sessions_.find(session);
  return it == sessions_.end() ? nullptr : &it->second;
}

WorkerRegistry::Worker* WorkerRegistry::ByName(const std::string& name) {
  auto it = session_by_name_.find(name);
  return it == session_by_name_.end() ? nullptr : &sessions_.at(it->second);
}

const WorkerRegistry::Worker* WorkerRegistry::ByName(const std::string& name) const {
  auto it = session_by_name_.find(name);
  return it == session_by_name_.end() ? nullptr : &sessions_.at(it->second);
}

WorkerRegistry::Admission WorkerRegistry::CheckRegister(const Worker& worker, const kiln::v1::Register& reg) const {
  Admission out;
  if (!worker.name.empty()) {
    out.refused = absl::FailedPreconditionError("worker registered twice on one stream");
  } else if (reg.name().empty() || reg.name().size() > 128) {
    out.refused = absl::InvalidArgumentError("worker name must have 1 to 128 characters");
  } else if (reg.systems().empty()) {
    out.refused = absl::InvalidArgumentError("worker offers no system");
  } else if (reg.max_jobs() < 1 || reg.max_jobs() > options_.max_worker_jobs) {
    out.refused = absl::InvalidArgumentError(absl::StrCat("max_jobs must be 1 to ", options_.max_worker_jobs));
  }
  if (!out.refused.ok()) return out;
  const Worker* existing = ByName(reg.name());
  if (existing == nullptr) return out;
  // A reconnect can arrive before the old stream is noticed as dead: the
  // same process (its instance id), or a stream silent for two heartbeat
  // intervals, is replaced. Another process under a live worker's name is
  // refused: two workers taking turns would each lose the other's jobs.
  const bool same_process = !reg.instance_id().empty() && reg.instance_id() == existing->instance_id;
  const absl::Duration silent = clock_->Now() - existing->last_seen;
  if (!same_process && silent < 2 * HeartbeatInterval()) {
    out.refused = absl::AlreadyExistsError(absl::StrFormat(
        "a worker named '%s' is connected already (another process; its last message came %ds ago): give each "
        "worker a --name of its own",
        reg.name(), absl::ToInt64Seconds(silent)));
    return out;
  }
  out.replaces = existing->session.get();
  return out;
}

void WorkerRegistry::Bind(Worker& worker, const kiln::v1::Register& reg) {
  worker.name = reg.name();
  worker.instance_id = reg.instance_id();
  session_by_name_[worker.name] = worker.session.get();
  lease_until_.erase(worker.name);
}

WorkerCapabilities WorkerRegistry::CapabilitiesOf(const kiln::v1::Register& reg) {
  WorkerCapabilities caps;
  caps.systems.insert(reg.systems().begin(), reg.systems().end());
  caps.supported_features.insert(reg.supported_features().begin(), reg.supported_features().end());
  caps.mandatory_features.insert(reg.mandatory_features().begin(), reg.mandatory_features().end());
  caps.labels.insert(reg.labels().begin(), reg.labels().end());
  caps.max_jobs = static_cast<int>(reg.max_jobs());
  caps.speed_factor = reg.speed_factor() > 0 ? reg.speed_factor() : 1.0;
  return caps;
}

absl::Duration WorkerRegistry::HeartbeatInterval() const {
  // Three beats per lease at least: a worker whose builds print nothing
  // must not look dead between two of them.
  return options_.lease > absl::ZeroDuration() ? std::min(options_.heartbeat_interval, options_.lease / 3)
                                               : options_.heartbeat_interval;
}

kiln::v1::CoordinatorMessage WorkerRegistry::Registered(const Worker& worker) const {
  kiln::v1::CoordinatorMessage reply;
  reply.mutable_registered()->set_worker_id(worker.name);
  *reply.mutable_registered()->mutable_heartbeat_interval() = ToProtoDuration(HeartbeatInterval());
  *reply.mutable_registered()->mutable_lease() = ToProtoDuration(options_.lease);
  return reply;
}

std::string WorkerRegistry::Heartbeat(Worker& worker, const kiln::v1::Heartbeat& heartbeat, int slots) {
  worker.last_heartbeat = heartbeat;
  worker.last_heartbeat.clear_running();
  slots = std::max(1, slots);
  const auto gib = [](int64_t bytes) { return absl::StrFormat("%.1f GiB", static_cast<double>(bytes) / (1 << 30)); };
  if (options_.min_store_free_bytes > 0 && heartbeat.store_free_bytes() > 0 &&
      heartbeat.store_free_bytes() < options_.min_store_free_bytes) {
    return absl::StrCat(gib(heartbeat.store_free_bytes()), " free on its Nix store, below ",
                        gib(options_.min_store_free_bytes));
  }
  if (options_.min_work_dir_free_bytes > 0 && heartbeat.work_dir_free_bytes() > 0 &&
      heartbeat.work_dir_free_bytes() < options_.min_work_dir_free_bytes) {
    return absl::StrCat(gib(heartbeat.work_dir_free_bytes()), " free on its work directory, below ",
                        gib(options_.min_work_dir_free_bytes));
  }
  if (options_.max_memory_used_fraction > 0 && heartbeat.memory_used_fraction() > options_.max_memory_used_fraction) {
    return absl::StrFormat("memory %.0f%% used, above %.0f%%", heartbeat.memory_used_fraction() * 100,
                           options_.max_memory_used_fraction * 100);
  }
  if (options_.max_load_per_slot > 0 && heartbeat.load_average() / slots > options_.max_load_per_slot) {
    return absl::StrFormat("load %.1f on %d slot(s), above %.1f per slot", heartbeat.load_average(), slots,
                           options_.max_load_per_slot);
  }
  return "";
}

std::optional<WorkerRegistry::Departure> WorkerRegistry::Gone(const WorkerSession* session) {
  auto it = sessions_.find(session);
  if (it == sessions_.end()) return std::nullopt;
  const std::string name = it->second.name;
  const absl::Time last_seen = it->second.last_seen;
  sessions_.erase(it);
  if (name.empty()) return std::nullopt;
  auto by_name = session_by_name_.find(name);
  if (by_name == session_by_name_.end() || by_name->second != session) return std::nullopt;
  session_by_name_.erase(by_name);
  Departure out{.name = name, .lease_until = last_seen + options_.lease};
  lease_until_[name] = out.lease_until;
  out.lease_over = clock_->Now() >= out.lease_until;
  return out;
}

std::vector<const WorkerSession*> WorkerRegistry::Silent() const {
  const absl::Time now = clock_->Now();
  std::vector<const WorkerSession*> out;
  for (const auto& [session, worker] : sessions_) {
    if (!worker.name.empty() && now - worker.last_seen >= options_.lease) out.push_back(session);
  }
  return out;
}

std::vector<std::string> WorkerRegistry::ExpiredLeases() const {
  const absl::Time now = clock_->Now();
  std::vector<std::string> out;
  for (const auto& [name, until] : lease_until_) {
    if (now >= until) out.push_back(name);
  }
  std::sort(out.begin(), out.end());  // A deterministic order of requeues.
  return out;
}

std::optional<absl::Time> WorkerRegistry::lease_until(const std::string& name) const {
  auto it = lease_until_.find(name);
  if (it == lease_until_.end()) return std::nullopt;
  return it->second;
}

std::string WorkerRegistry::LeaseExpiredReason() const {
  return absl::StrCat("did not come back within the lease (", absl::FormatDuration(options_.lease), ")");
}

void WorkerRegistry::SetDrained(const std::string& name, bool drained) {
  if (drained) {
    drained_.insert(name);
  } else {
    drained_.erase(name);
  }
}

void WorkerRegistry::Send(Worker& worker, kiln::v1::CoordinatorMessage message) {
  if (worker.outbox.empty()) with_outbox_.push_back(worker.session.get());
  worker.outbox.push_back(std::move(message));
}

void WorkerRegistry::Assign(Worker& worker, kiln::v1::Assignment assignment) {
  // The first assignment of a message goes in `assign`, so a message with
  // one is what older workers expect; more join it in `assignments`.
  if (!worker.outbox.empty()) {
    kiln::v1::CoordinatorMessage& last = worker.outbox.back();
    if (last.kind_case() == kiln::v1::CoordinatorMessage::kAssign) {
      *last.add_assignments() = std::move(assignment);
      return;
    }
    if (last.kind_case() == kiln::v1::CoordinatorMessage::KIND_NOT_SET) {
      *last.mutable_assign() = std::move(assignment);
      return;
    }
  }
  kiln::v1::CoordinatorMessage message;
  *message.mutable_assign() = std::move(assignment);
  Send(worker, std::move(message));
}

void WorkerRegistry::Ack(Worker& worker, const std::string& job_id, uint32_t attempt) {
  if (worker.outbox.empty()) Send(worker, kiln::v1::CoordinatorMessage());
  kiln::v1::ResultAck* ack = worker.outbox.back().add_acks();
  ack->set_job_id(job_id);
  ack->set_attempt(attempt);
}

void WorkerRegistry::DeliverOutboxes() {
  std::vector<const WorkerSession*> targets;
  targets.swap(with_outbox_);
  for (const WorkerSession* session : targets) {
    auto it = sessions_.find(session);
    if (it == sessions_.end()) continue;  // Gone meanwhile.
    // A full or closed stream means the worker is going away; its Gone
    // then holds or requeues its jobs.
    for (auto& message : it->second.outbox) it->second.session->Send(std::move(message));
    it->second.outbox.clear();
  }
}

void WorkerRegistry::CloseAll(const absl::Status& status) {
  for (auto& [_, worker] : sessions_) worker.session->Close(status);
}

}  // namespace kiln
