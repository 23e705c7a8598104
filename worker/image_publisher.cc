#include "worker/image_publisher.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/grpc_util.h"
#include "common/image_ref.h"
#include "push/credentials.h"
#include "push/registry_client.h"
#include "common/status_macros.h"

namespace kiln {

RegistryPublisher::RegistryPublisher(RegistryPublisherOptions options, WorkerMetrics* metrics)
    : options_(std::move(options)), metrics_(metrics), cache_(options_.layer_cache_file) {}

absl::StatusOr<kiln::v1::PushResult> RegistryPublisher::Publish(const kiln::v1::PushTarget& push,
                                                                const std::string& output,
                                                                absl::FunctionRef<void(absl::string_view)> log) {
  absl::StatusOr<kiln::v1::PushResult> result = Push(push, output, log);
  if (metrics_ == nullptr) return result;
  if (!result.ok()) {
    // Bounded labels: the kind of error, never the registry or the image.
    switch (result.status().code()) {
      case absl::StatusCode::kUnauthenticated: metrics_->PushFailures("unauthorized").Increment(); break;
      case absl::StatusCode::kPermissionDenied: metrics_->PushFailures("denied").Increment(); break;
      case absl::StatusCode::kNotFound: metrics_->PushFailures("not_found").Increment(); break;
      case absl::StatusCode::kInvalidArgument: metrics_->PushFailures("invalid").Increment(); break;
      case absl::StatusCode::kUnavailable: metrics_->PushFailures("unavailable").Increment(); break;
      default: metrics_->PushFailures("other").Increment(); break;
    }
    return result;
  }
  metrics_->push_bytes.Increment(static_cast<double>(result->bytes_uploaded()));
  metrics_->push_duration.Observe(absl::ToDoubleSeconds(FromProtoDuration(result->duration())));
  for (const auto& l : result->layers()) {
    metrics_->PushedBlobs(l.mounted() ? "mounted" : l.skipped() ? "skipped" : "pushed").Increment();
  }
  metrics_->PushedBlobs(result->config().skipped() ? "skipped" : "pushed").Increment();
  return result;
}

absl::StatusOr<kiln::v1::PushResult> RegistryPublisher::Push(const kiln::v1::PushTarget& push,
                                                             const std::string& output,
                                                             absl::FunctionRef<void(absl::string_view)> log) {
  const absl::Time start = absl::Now();
  // Checked by the coordinator already; checked again here, as these are
  // what the registry's URLs are made of.
  absl::StatusOr<ImageRef> ref = ParsePushRepository(push.repository());
  if (!ref.ok()) return ref.status();
  for (const std::string& tag : push.tags()) {
    RETURN_IF_ERROR(ValidateImageTag(tag));
  }
  RegistryOptions registry;
  registry.plain_http = options_.insecure_registries.contains(ref->registry);
  registry.ca_file = options_.ca_file;
  if (!options_.auth_file.empty()) {
    absl::StatusOr<RegistryCredentials> creds = LoadDockerCredentials(options_.auth_file, ref->registry);
    if (!creds.ok()) return creds.status();
    registry.credentials = *std::move(creds);
  }
  // A registry that does not answer is retried with back-off: each retry is
  // a line of the job's log, not a silence.
  registry.on_retry = [&log](absl::string_view line) { log(line); };
  log(absl::StrCat("pushing to ", push.repository(), " (tags ", absl::StrJoin(push.tags(), ", "), ")"));
  HttpRegistryClient client(ref->registry, registry);
  PushOptions options{.gzip_level = options_.gzip_level,
                      .scratch_dir = options_.scratch_dir,
                      .cache = &cache_,
                      .oci_manifest = push.manifest_format() == kiln::v1::MANIFEST_FORMAT_OCI,
                      .parallel = options_.parallel,
                      .make_client = [&] { return std::make_unique<HttpRegistryClient>(ref->registry, registry); },
                      .stream_hold_bytes = 8 << 20,
                      .on_layer = nullptr};
  absl::StatusOr<PushReport> report =
      PushImage(output, *ref, std::vector<std::string>(push.tags().begin(), push.tags().end()), client, options);
  if (!report.ok()) return report.status();

  kiln::v1::PushResult result;
  result.set_image(absl::StrCat(push.repository(), "@", report->manifest_digest));
  result.set_manifest_digest(report->manifest_digest);
  result.set_manifest_size(static_cast<int64_t>(report->manifest_size));
  for (const auto& t : report->tags) result.add_tags(t);
  const auto fill = [](const PushedBlob& b, kiln::v1::PushedBlob* out) {
    out->set_digest(b.digest);
    out->set_size(static_cast<int64_t>(b.size));
    out->set_skipped(b.skipped);
    out->set_mounted(b.mounted);
  };
  fill(report->config, result.mutable_config());
  int skipped = 0;
  for (const auto& l : report->layers) {
    fill(l, result.add_layers());
    skipped += l.skipped;
  }
  result.set_bytes_uploaded(static_cast<int64_t>(report->bytes_uploaded));
  *result.mutable_duration() = ToProtoDuration(absl::Now() - start);
  log(absl::StrFormat("pushed %s (%d layer(s): %d sent, %d already there; %.1f MiB uploaded)", result.image(),
                      report->layers.size(), report->layers.size() - skipped, skipped,
                      report->bytes_uploaded / 1048576.0));
  return result;
}

}  // namespace kiln
