//! Every metric the agent exports, in one registry. Names are in docs/names.md and stay stable:
//! dashboards and alerts depend on them. Labels are bounded: image labels only name images in this node's
//! desired set.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub const PREFIX: &str = "runner_warden";

/// Pull results for `prewarm_pulls_total{result}`: `success`, `skipped`, or a failure class.
pub const RESULTS: [&str; 8] = [
    "success",
    "skipped",
    "auth",
    "not_found",
    "network",
    "stalled",
    "secret",
    "other",
];

pub struct Metrics {
    registry: Registry,
    pub prewarm_images: IntGaugeVec,
    pub prewarm_pulls_total: IntCounterVec,
    pub prewarm_pull_duration_seconds: Histogram,
    pub prewarm_bytes_total: IntCounter,
    pub prewarm_progress_bytes: IntGaugeVec,
    pub prewarm_images_over_cap: IntGaugeVec,
    pub prewarm_held_bytes: IntGauge,
    pub pinning_honoured: IntGauge,
    pub runtime_up: IntGauge,
    pub api_server_up: IntGauge,
    pub config_reloads_total: IntCounterVec,
    pub events_total: IntCounterVec,
    pub image_violations: IntGaugeVec,
    pub image_audits_total: IntCounterVec,
    pub image_audit_duration_seconds: Histogram,
    pub scan_duration_seconds: Histogram,
    pub process_violations_total: IntCounterVec,
    pub noncompliant_containers: IntGaugeVec,
    pub scanned_processes: IntGauge,
    pub unread_processes: IntGauge,
    pub proc_connector_up: IntGauge,
    pub shutdown_duration_seconds: Histogram,
    pub shutdowns_total: IntCounterVec,
    pub task_events_up: IntGauge,
    pub build_info: IntGaugeVec,
    pub api_requests_total: IntCounterVec,
    pub node_status_writes_total: IntCounterVec,
    pub pull_slot_held: IntGauge,
    pub pull_slot_wait_seconds: Histogram,
    pub credential_provider_lookups_total: IntCounterVec,
    pub tag_resolutions_total: IntCounterVec,
}

fn name(n: &str) -> String {
    format!("{PREFIX}_{n}")
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let prewarm_images = IntGaugeVec::new(
            Opts::new(
                name("prewarm_images"),
                "Desired runner images by prewarm state.",
            ),
            &["state"],
        )
        .expect("valid metric");
        let prewarm_pulls_total = IntCounterVec::new(
            Opts::new(
                name("prewarm_pulls_total"),
                "Prewarm attempts by result: success, skipped (already present) or the failure class.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let prewarm_pull_duration_seconds = Histogram::with_opts(
            HistogramOpts::new(
                name("prewarm_pull_duration_seconds"),
                "Wall time of successful pulls through CRI.",
            )
            .buckets(vec![
                0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
            ]),
        )
        .expect("valid metric");
        let prewarm_bytes_total = IntCounter::new(
            name("prewarm_bytes_total"),
            "Bytes of image content downloaded by prewarm pulls (from containerd's ingests).",
        )
        .expect("valid metric");
        let prewarm_progress_bytes = IntGaugeVec::new(
            Opts::new(
                name("prewarm_progress_bytes"),
                "Bytes done and total of pulls in progress, per image (series removed when the pull ends).",
            ),
            &["image", "kind"],
        )
        .expect("valid metric");
        let prewarm_images_over_cap = IntGaugeVec::new(
            Opts::new(
                name("prewarm_images_over_cap"),
                "Desired runner images not held on this node because of a cap: images (prewarm.max_images) or bytes (prewarm.max_pinned_bytes).",
            ),
            &["cap"],
        )
        .expect("valid metric");
        let prewarm_held_bytes = IntGauge::new(
            name("prewarm_held_bytes"),
            "Bytes of the runner images this node holds (CRI's image sizes), what prewarm.max_pinned_bytes caps.",
        )
        .expect("valid metric");
        let pinning_honoured = IntGauge::new(
            name("runtime_pinning_honoured"),
            "1 when the runtime reports pinned images as pinned through CRI, 0 when it ignores the pin label (containerd < 1.7), -1 before the first pin.",
        )
        .expect("valid metric");
        let runtime_up = IntGauge::new(
            name("runtime_up"),
            "1 when the last call to containerd succeeded.",
        )
        .expect("valid metric");
        let api_server_up = IntGauge::new(
            name("api_server_up"),
            "With a cluster: 1 when the API server answered the last call, 0 when it could not be reached; -1 standalone or before the first call.",
        )
        .expect("valid metric");
        let config_reloads_total = IntCounterVec::new(
            Opts::new(
                name("config_reloads_total"),
                "Configuration reloads by result.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let events_total = IntCounterVec::new(
            Opts::new(
                name("events_total"),
                "Findings by result: written (JSON line, or Event with a cluster), failed (write or API rejection), dropped (event queue full), spam_limited, other_node (cluster-wide finding left to the lease holder), expired (held back for a takeover that did not come within 5 min), no_object.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let image_violations = IntGaugeVec::new(
            Opts::new(
                name("image_violations"),
                "Desired images whose static contract audit fails the check as a violation.",
            ),
            &["check"],
        )
        .expect("valid metric");
        let image_audits_total = IntCounterVec::new(
            Opts::new(
                name("image_audits_total"),
                "Static image audits by result: ok (audited), cached (image id seen before), error (could not be read).",
            ),
            &["result"],
        )
        .expect("valid metric");
        let image_audit_duration_seconds = Histogram::with_opts(
            HistogramOpts::new(
                name("image_audit_duration_seconds"),
                "Wall time of one static image audit (every layer read from the content store).",
            )
            .buckets(vec![
                0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
        )
        .expect("valid metric");
        let scan_duration_seconds = Histogram::with_opts(
            HistogramOpts::new(
                name("scan_duration_seconds"),
                "Wall time of one runtime audit scan (containers, their processes, /proc).",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )
        .expect("valid metric");
        let process_violations_total = IntCounterVec::new(
            Opts::new(
                name("process_violations_total"),
                "Runtime violations found (once per container and check while it persists).",
            ),
            &["check"],
        )
        .expect("valid metric");
        let noncompliant_containers = IntGaugeVec::new(
            Opts::new(
                name("noncompliant_containers"),
                "Runner containers failing the check now (drops when they comply again or go away).",
            ),
            &["check"],
        )
        .expect("valid metric");
        let scanned_processes = IntGauge::new(
            name("scanned_processes"),
            "Processes read in the last full runtime audit scan.",
        )
        .expect("valid metric");
        let unread_processes = IntGauge::new(
            name("unread_processes"),
            "Runner processes over the per-container bound, not read by the last full runtime scan (later scans read them in turn).",
        )
        .expect("valid metric");
        let proc_connector_up = IntGauge::new(
            name("proc_connector_up"),
            "1 when kernel process events drive rescans; 0 when only polling (connector refused or off).",
        )
        .expect("valid metric");
        let shutdown_duration_seconds = Histogram::with_opts(
            HistogramOpts::new(
                name("shutdown_duration_seconds"),
                "Runner containers' stop request to exit (containerd's exited_at).",
            )
            .buckets(vec![
                0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0,
            ]),
        )
        .expect("valid metric");
        let shutdowns_total = IntCounterVec::new(
            Opts::new(
                name("shutdowns_total"),
                "Runner container exits by outcome: graceful, slow, sigkilled, oom, crashed, unknown (status lost in a containerd restart).",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let task_events_up = IntGauge::new(
            name("task_events_up"),
            "1 while subscribed to containerd's task events (shutdown timing), else 0.",
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new(
                name("build_info"),
                "Always 1; the version label says which build runs.",
            ),
            &["version"],
        )
        .expect("valid metric");

        let api_requests_total = IntCounterVec::new(
            Opts::new(
                name("api_requests_total"),
                "Requests this agent sent to the Kubernetes API server, by verb (get, list, watch, create, update, patch, delete) and resource.",
            ),
            &["verb", "resource"],
        )
        .expect("valid metric");
        let node_status_writes_total = IntCounterVec::new(
            Opts::new(
                name("node_status_writes_total"),
                "Writes of this node's NodeRunnerImages object by result (written, failed).",
            ),
            &["result"],
        )
        .expect("valid metric");
        let pull_slot_held = IntGauge::new(
            name("pull_slot_held"),
            "Cluster-wide pull slots (fleet.max_nodes_pulling) this node holds now: one per pull of a new image under the budget.",
        )
        .expect("valid metric");
        let pull_slot_wait_seconds = Histogram::with_opts(
            HistogramOpts::new(
                name("pull_slot_wait_seconds"),
                "How long a pull waited for a cluster-wide pull slot (also when it went ahead without one because the API server was away or refused).",
            )
            .buckets(vec![
                0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
            ]),
        )
        .expect("valid metric");
        let credential_provider_lookups_total = IntCounterVec::new(
            Opts::new(
                name("credential_provider_lookups_total"),
                "Credential provider plugins asked for an image's credentials, by provider (its name in the node's CredentialProviderConfig) and result (cached, answered, failed).",
            ),
            &["provider", "result"],
        )
        .expect("valid metric");
        let tag_resolutions_total = IntCounterVec::new(
            Opts::new(
                name("tag_resolutions_total"),
                "Tags this agent asked the registry about as the cluster's reporter (tags resolved once per cluster), by result (resolved, failed). Only the reporter's count moves.",
            ),
            &["result"],
        )
        .expect("valid metric");
        for r in ["resolved", "failed"] {
            tag_resolutions_total.with_label_values(&[r]);
        }
        for c in [
            Box::new(prewarm_images.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(tag_resolutions_total.clone()),
            Box::new(credential_provider_lookups_total.clone()),
            Box::new(api_requests_total.clone()),
            Box::new(node_status_writes_total.clone()),
            Box::new(prewarm_pulls_total.clone()),
            Box::new(prewarm_pull_duration_seconds.clone()),
            Box::new(prewarm_bytes_total.clone()),
            Box::new(prewarm_progress_bytes.clone()),
            Box::new(prewarm_images_over_cap.clone()),
            Box::new(prewarm_held_bytes.clone()),
            Box::new(pinning_honoured.clone()),
            Box::new(runtime_up.clone()),
            Box::new(api_server_up.clone()),
            Box::new(config_reloads_total.clone()),
            Box::new(events_total.clone()),
            Box::new(image_violations.clone()),
            Box::new(image_audits_total.clone()),
            Box::new(image_audit_duration_seconds.clone()),
            Box::new(scan_duration_seconds.clone()),
            Box::new(process_violations_total.clone()),
            Box::new(noncompliant_containers.clone()),
            Box::new(scanned_processes.clone()),
            Box::new(unread_processes.clone()),
            Box::new(proc_connector_up.clone()),
            Box::new(shutdown_duration_seconds.clone()),
            Box::new(shutdowns_total.clone()),
            Box::new(task_events_up.clone()),
            Box::new(build_info.clone()),
            Box::new(pull_slot_held.clone()),
            Box::new(pull_slot_wait_seconds.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        // Pre-create the label values so dashboards see zeros rather than gaps.
        for s in crate::model::ImageState::ALL.map(|s| s.label()) {
            prewarm_images.with_label_values(&[s]).set(0);
        }
        for c in crate::model::OverCap::LABELS {
            prewarm_images_over_cap.with_label_values(&[c]).set(0);
        }
        for r in RESULTS {
            prewarm_pulls_total.with_label_values(&[r]);
        }
        for r in [
            "written",
            "failed",
            "dropped",
            "spam_limited",
            "other_node",
            "expired",
            "no_object",
        ] {
            events_total.with_label_values(&[r]);
        }
        for c in crate::contract::CHECKS {
            image_violations.with_label_values(&[c]).set(0);
        }
        for c in crate::contract::process::PROCESS_CHECKS {
            process_violations_total.with_label_values(&[c]);
            noncompliant_containers.with_label_values(&[c]).set(0);
        }
        for r in ["written", "failed"] {
            node_status_writes_total.with_label_values(&[r]);
        }
        for r in ["ok", "cached", "error"] {
            image_audits_total.with_label_values(&[r]);
        }
        for o in ["graceful", "slow", "sigkilled", "oom", "crashed", "unknown"] {
            shutdowns_total.with_label_values(&[o]);
        }
        pinning_honoured.set(-1);
        api_server_up.set(-1);
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Self {
            registry,
            prewarm_images,
            prewarm_pulls_total,
            prewarm_pull_duration_seconds,
            prewarm_bytes_total,
            prewarm_progress_bytes,
            prewarm_images_over_cap,
            prewarm_held_bytes,
            pinning_honoured,
            runtime_up,
            api_server_up,
            config_reloads_total,
            events_total,
            image_violations,
            image_audits_total,
            image_audit_duration_seconds,
            scan_duration_seconds,
            process_violations_total,
            noncompliant_containers,
            scanned_processes,
            unread_processes,
            proc_connector_up,
            shutdown_duration_seconds,
            shutdowns_total,
            task_events_up,
            build_info,
            api_requests_total,
            node_status_writes_total,
            pull_slot_held,
            pull_slot_wait_seconds,
            credential_provider_lookups_total,
            tag_resolutions_total,
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding of gathered metrics cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_design_card() {
        let text = Metrics::new().render();
        for n in [
            "runner_warden_prewarm_images{state=\"ready\"} 0",
            "runner_warden_prewarm_pulls_total{result=\"auth\"} 0",
            "runner_warden_prewarm_pull_duration_seconds_bucket",
            "runner_warden_prewarm_bytes_total 0",
            "runner_warden_events_total{result=\"written\"} 0",
            "runner_warden_build_info{version=",
            "runner_warden_runtime_pinning_honoured -1",
            "runner_warden_pull_slot_held 0",
            "runner_warden_pull_slot_wait_seconds_bucket",
        ] {
            assert!(text.contains(n), "missing {n} in\n{text}");
        }
    }
}
