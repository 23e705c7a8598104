// WorkerRegistry on its own, on a FakeClock: registration and the reconnect
// rules, leases, admission limits and the outbox.
#include "coordinator/worker_registry.h"

#include "common/grpc_util.h"

#include <gtest/gtest.h>

#include "tests/support/coordinator_fakes.h"
#include "tests/support/fake_clock.h"

namespace kiln {
namespace {

using kiln::v1::CoordinatorMessage;

kiln::v1::Register Reg(const std::string& name, const std::string& instance = "", uint32_t slots = 2) {
  kiln::v1::Register reg;
  reg.set_name(name);
  reg.add_systems("x86_64-linux");
  reg.set_max_jobs(slots);
  reg.set_instance_id(instance);
  return reg;
}

struct Fixture {
  testing::FakeClock clock;
  WorkerRegistry registry{
      &clock,
      WorkerRegistryOptions{.heartbeat_interval = absl::Seconds(10), .lease = absl::Seconds(60), .max_worker_jobs = 8}};
  // Registers a new stream under `name`; the admission it got.
  WorkerRegistry::Admission Connect(const std::shared_ptr<testing::FakeWorkerSession>& session,
                                    const kiln::v1::Register& reg) {
    WorkerRegistry::Worker& w = registry.Seen(session);
    WorkerRegistry::Admission a = registry.CheckRegister(w, reg);
    if (a.refused.ok()) {
      if (a.replaces != nullptr) registry.Gone(a.replaces);
      registry.Bind(w, reg);
    }
    return a;
  }
};

TEST(WorkerRegistry, RefusesMalformedRegistrations) {
  Fixture f;
  auto s = std::make_shared<testing::FakeWorkerSession>();
  EXPECT_EQ(f.Connect(s, Reg("")).refused.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(f.Connect(s, Reg("w", "", 9)).refused.code(), absl::StatusCode::kInvalidArgument);
  kiln::v1::Register no_system = Reg("w");
  no_system.clear_systems();
  EXPECT_EQ(f.Connect(s, no_system).refused.code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(f.Connect(s, Reg("w")).refused.ok());
  EXPECT_EQ(f.Connect(s, Reg("w")).refused.code(), absl::StatusCode::kFailedPrecondition)
      << "a second Register on one stream";
}

TEST(WorkerRegistry, WorkersAreToldToBeatOftenEnoughForTheLease) {
  // A lease shorter than the heartbeat interval: an idle worker's stream,
  // with builds that print nothing, would look dead between two beats.
  testing::FakeClock clock;
  WorkerRegistry short_lease{&clock,
                             WorkerRegistryOptions{.heartbeat_interval = absl::Seconds(10), .lease = absl::Seconds(2)}};
  auto s = std::make_shared<testing::FakeWorkerSession>();
  WorkerRegistry::Worker& w = short_lease.Seen(s);
  ASSERT_TRUE(short_lease.CheckRegister(w, Reg("w")).refused.ok());
  short_lease.Bind(w, Reg("w"));
  const kiln::v1::CoordinatorMessage reply = short_lease.Registered(w);
  EXPECT_LE(FromProtoDuration(reply.registered().heartbeat_interval()), absl::Seconds(2) / 3);
  // The usual settings stand.
  Fixture f;
  auto t = std::make_shared<testing::FakeWorkerSession>();
  ASSERT_TRUE(f.Connect(t, Reg("v")).refused.ok());
  WorkerRegistry::Worker& v = f.registry.Seen(t);
  EXPECT_EQ(FromProtoDuration(f.registry.Registered(v).registered().heartbeat_interval()), absl::Seconds(10));
}

TEST(WorkerRegistry, AnotherProcessUnderALiveNameIsRefusedTheSameProcessReplacesItsStream) {
  Fixture f;
  auto first = std::make_shared<testing::FakeWorkerSession>();
  ASSERT_TRUE(f.Connect(first, Reg("w", "process-a")).refused.ok());
  f.clock.Advance(absl::Seconds(5));
  auto intruder = std::make_shared<testing::FakeWorkerSession>();
  WorkerRegistry::Admission refused = f.Connect(intruder, Reg("w", "process-b"));
  EXPECT_EQ(refused.refused.code(), absl::StatusCode::kAlreadyExists);
  EXPECT_NE(refused.refused.message().find("--name"), std::string::npos) << refused.refused;
  f.registry.Gone(intruder.get());
  auto again = std::make_shared<testing::FakeWorkerSession>();
  WorkerRegistry::Admission replaced = f.Connect(again, Reg("w", "process-a"));
  ASSERT_TRUE(replaced.refused.ok());
  EXPECT_EQ(replaced.replaces, first.get());
  EXPECT_EQ(f.registry.ByName("w")->session.get(), again.get());
}

TEST(WorkerRegistry, AStreamSilentForTwoHeartbeatsIsReplacedByAnyProcess) {
  Fixture f;
  auto first = std::make_shared<testing::FakeWorkerSession>();
  ASSERT_TRUE(f.Connect(first, Reg("w", "process-a")).refused.ok());
  f.clock.Advance(absl::Seconds(20));
  auto other = std::make_shared<testing::FakeWorkerSession>();
  WorkerRegistry::Admission a = f.Connect(other, Reg("w", "process-b"));
  ASSERT_TRUE(a.refused.ok()) << a.refused;
  EXPECT_EQ(a.replaces, first.get());
}

TEST(WorkerRegistry, ADepartedWorkerIsHeldForOneLeaseFromItsLastMessage) {
  Fixture f;
  auto s = std::make_shared<testing::FakeWorkerSession>();
  ASSERT_TRUE(f.Connect(s, Reg("w")).refused.ok());
  f.clock.Advance(absl::Seconds(10));
  f.registry.Seen(s);  // A heartbeat.
  f.clock.Advance(absl::Seconds(30));
  std::optional<WorkerRegistry::Departure> gone = f.registry.Gone(s.get());
  ASSERT_TRUE(gone.has_value());
  EXPECT_EQ(gone->name, "w");
  EXPECT_FALSE(gone->lease_over);
  EXPECT_EQ(gone->lease_until, f.clock.Now() + absl::Seconds(30));
  EXPECT_EQ(f.registry.ByName("w"), nullptr);
  EXPECT_EQ(f.registry.lease_until("w"), gone->lease_until);
  f.clock.Advance(absl::Seconds(29));
  EXPECT_TRUE(f.registry.ExpiredLeases().empty());
  f.clock.Advance(absl::Seconds(1));
  EXPECT_EQ(f.registry.ExpiredLeases(), std::vector<std::string>{"w"});
  // Coming back ends the lease.
  auto back = std::make_shared<testing::FakeWorkerSession>();
  ASSERT_TRUE(f.Connect(back, Reg("w")).refused.ok());
  EXPECT_TRUE(f.registry.ExpiredLeases().empty());
  EXPECT_FALSE(f.registry.lease_until("w").has_value());
}

TEST(WorkerRegistry, SilentStreamsAreNamedAndTheirLeaseIsAlreadyOver) {
  Fixture f;
  auto quiet = std::make_shared<testing::FakeWorkerSession>(), chatty = std::make_shared<testing::FakeWorkerSession>();
  ASSERT_TRUE(f.Connect(quiet, Reg("quiet")).refused.ok());
  ASSERT_TRUE(f.Connect(chatty, Reg("chatty")).refused.ok());
  f.clock.Advance(absl::Seconds(59));
  f.registry.Seen(chatty);
  EXPECT_TRUE(f.registry.Silent().empty());
  f.clock.Advance(absl::Seconds(1));
  EXPECT_EQ(f.registry.Silent(), std::vector<const WorkerSession*>{quiet.get()});
  std::optional<WorkerRegistry::Departure> gone = f.registry.Gone(quiet.get());
  ASSERT_TRUE(gone.has_value());
  EXPECT_TRUE(gone->lease_over);
}

TEST(WorkerRegistry, AReplacedStreamEndingIsNoDeparture) {
  Fixture f;
  auto old_stream = std::make_shared<testing::FakeWorkerSession>();
  ASSERT_TRUE(f.Connect(old_stream, Reg("w", "p")).refused.ok());
  // The same process reconnects before its old stream is noticed as dead;
  // the old one's end then must not take the new one's name away.
  auto new_stream = std::make_shared<testing::FakeWorkerSession>();
  WorkerRegistry::Worker& w = f.registry.Seen(new_stream);
  WorkerRegistry::Admission a = f.registry.CheckRegister(w, Reg("w", "p"));
  ASSERT_EQ(a.replaces, old_stream.get());
  f.registry.Bind(w, Reg("w", "p"));
  EXPECT_FALSE(f.registry.Gone(old_stream.get()).has_value());
  EXPECT_EQ(f.registry.ByName("w")->session.get(), new_stream.get());
}

TEST(WorkerRegistry, AdmissionLimitsNameTheFirstLimitPassed) {
  testing::FakeClock clock;
  WorkerRegistry registry(&clock, {.min_store_free_bytes = int64_t{1} << 30,
                                   .min_work_dir_free_bytes = int64_t{512} << 20,
                                   .max_memory_used_fraction = 0.9,
                                   .max_load_per_slot = 2});
  auto s = std::make_shared<testing::FakeWorkerSession>();
  WorkerRegistry::Worker& w = registry.Seen(s);
  kiln::v1::Heartbeat hb;
  hb.set_store_free_bytes(int64_t{4} << 30);
  hb.set_work_dir_free_bytes(int64_t{4} << 30);
  hb.set_memory_used_fraction(0.5);
  hb.set_load_average(3);
  hb.add_running()->set_job_id("7");
  EXPECT_EQ(registry.Heartbeat(w, hb, 2), "");
  EXPECT_EQ(w.last_heartbeat.running_size(), 0) << "running jobs are not kept per heartbeat";
  hb.set_load_average(5);
  EXPECT_EQ(registry.Heartbeat(w, hb, 2), "load 5.0 on 2 slot(s), above 2.0 per slot");
  hb.set_memory_used_fraction(0.95);
  EXPECT_EQ(registry.Heartbeat(w, hb, 2), "memory 95% used, above 90%");
  hb.set_work_dir_free_bytes(int64_t{256} << 20);
  EXPECT_EQ(registry.Heartbeat(w, hb, 2), "0.2 GiB free on its work directory, below 0.5 GiB");
  hb.set_store_free_bytes(int64_t{1} << 29);
  EXPECT_EQ(registry.Heartbeat(w, hb, 2), "0.5 GiB free on its Nix store, below 1.0 GiB");
}

TEST(WorkerRegistry, TheOutboxWaitsForDeliveryAndPacksAssignmentsAndAcks) {
  Fixture f;
  auto s = std::make_shared<testing::FakeWorkerSession>();
  ASSERT_TRUE(f.Connect(s, Reg("w")).refused.ok());
  WorkerRegistry::Worker& w = *f.registry.ByName("w");
  f.registry.Ack(w, "1", 1);
  kiln::v1::Assignment a;
  a.set_job_id("2");
  f.registry.Assign(w, a);
  a.set_job_id("3");
  f.registry.Assign(w, a);
  f.registry.Ack(w, "4", 2);
  EXPECT_TRUE(s->sent.empty()) << "nothing goes before the write it announces";
  f.registry.DeliverOutboxes();
  ASSERT_EQ(s->sent.size(), 1u);
  const CoordinatorMessage& m = s->sent[0];
  EXPECT_EQ(m.assign().job_id(), "2");
  ASSERT_EQ(m.assignments_size(), 1);
  EXPECT_EQ(m.assignments(0).job_id(), "3");
  EXPECT_EQ(m.acks_size(), 2);
  f.registry.DeliverOutboxes();
  EXPECT_EQ(s->sent.size(), 1u);
  // A worker gone before delivery gets nothing, and nothing breaks.
  f.registry.Send(w, f.registry.Registered(w));
  f.registry.Gone(s.get());
  f.registry.DeliverOutboxes();
  EXPECT_EQ(s->sent.size(), 1u);
}

TEST(WorkerRegistry, DrainOutlivesTheStream) {
  Fixture f;
  auto s = std::make_shared<testing::FakeWorkerSession>();
  ASSERT_TRUE(f.Connect(s, Reg("w")).refused.ok());
  f.registry.SetDrained("w", true);
  f.registry.Gone(s.get());
  EXPECT_TRUE(f.registry.drained("w"));
  f.registry.SetDrained("w", false);
  EXPECT_FALSE(f.registry.drained("w"));
}

}  // namespace
}  // namespace kiln
