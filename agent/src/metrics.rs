//! Every metric the agent exports (documented for users in docs/agent.md).
//!
//! The recorder is owned by [`Metrics`], not installed globally, so the library can run more
//! than once in a process (tests) without fighting over a global.

use std::time::Duration;

use metrics::{Key, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use nerve_notice::NoticeKind;

/// Notices first seen, by `kind`.
pub const NOTICES_TOTAL: &str = "nerve_agent_notices_total";
/// Metadata polls, by `outcome` (`ok`, `timeout`, `http_5xx`, `http_4xx`, `connection`,
/// `unparseable`).
pub const METADATA_POLLS_TOTAL: &str = "nerve_agent_metadata_polls_total";
/// Duration of each metadata poll (all endpoints of the cloud).
pub const METADATA_POLL_DURATION_SECONDS: &str = "nerve_agent_metadata_poll_duration_seconds";
/// Writes to the API server, by `action` (`cordon`, `uncordon`, `event`, `evict`) and `outcome`
/// (`ok`, `conflict`, `error`, `skipped`).
pub const NODE_ACTIONS_TOTAL: &str = "nerve_agent_node_actions_total";
/// From a notice's detection to the node being cordoned and tainted.
pub const NOTICE_TO_CORDON_SECONDS: &str = "nerve_agent_notice_to_cordon_seconds";
/// Connected watch-stream subscribers.
pub const SUBSCRIBERS: &str = "nerve_agent_subscribers";

/// Poll outcomes pre-registered at zero, so dashboards see every series from the start.
const POLL_OUTCOMES: [&str; 6] = [
    "ok",
    "timeout",
    "http_5xx",
    "http_4xx",
    "connection",
    "unparseable",
];

/// Metadata polls take milliseconds; the top buckets catch timeouts.
const POLL_DURATION_BUCKETS: [f64; 10] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0];

/// A cordon takes one poll plus an API round trip; the top buckets catch an API server outage
/// retried until the deadline.
const CORDON_BUCKETS: [f64; 11] = [0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0];

static METADATA: Metadata<'static> = Metadata::new("nerve_agent", Level::INFO, None);

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl Metrics {
    pub fn new() -> Self {
        let builder = PrometheusBuilder::new();
        let builder = match builder
            .set_buckets_for_metric(
                Matcher::Full(METADATA_POLL_DURATION_SECONDS.to_owned()),
                &POLL_DURATION_BUCKETS,
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(NOTICE_TO_CORDON_SECONDS.to_owned()),
                    &CORDON_BUCKETS,
                )
            }) {
            Ok(builder) => builder,
            // Only an empty bucket list is refused, and ours are constants.
            Err(_) => PrometheusBuilder::new(),
        };
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let metrics = Self { recorder, handle };
        metrics.describe();
        for kind in NoticeKind::ALL {
            metrics
                .counter(NOTICES_TOTAL, vec![Label::new("kind", kind.as_str())])
                .increment(0);
        }
        for outcome in POLL_OUTCOMES {
            metrics
                .counter(METADATA_POLLS_TOTAL, vec![Label::new("outcome", outcome)])
                .increment(0);
        }
        metrics.subscribers(0);
        metrics
    }

    fn describe(&self) {
        let r = &self.recorder;
        r.describe_counter(
            NOTICES_TOTAL.into(),
            None,
            "Notices first seen, by kind".into(),
        );
        r.describe_counter(
            METADATA_POLLS_TOTAL.into(),
            None,
            "Metadata service polls, by outcome".into(),
        );
        r.describe_histogram(
            METADATA_POLL_DURATION_SECONDS.into(),
            Some(Unit::Seconds),
            "Duration of a metadata poll".into(),
        );
        r.describe_counter(
            NODE_ACTIONS_TOTAL.into(),
            None,
            "Kubernetes writes for the node, by action and outcome".into(),
        );
        r.describe_histogram(
            NOTICE_TO_CORDON_SECONDS.into(),
            Some(Unit::Seconds),
            "Time from a notice's detection to the node cordoned and tainted".into(),
        );
        r.describe_gauge(
            SUBSCRIBERS.into(),
            None,
            "Connected watch-stream subscribers".into(),
        );
    }

    fn counter(&self, name: &'static str, labels: Vec<Label>) -> metrics::Counter {
        self.recorder
            .register_counter(&Key::from_parts(name, labels), &METADATA)
    }

    pub fn notice_seen(&self, kind: NoticeKind) {
        self.counter(NOTICES_TOTAL, vec![Label::new("kind", kind.as_str())])
            .increment(1);
    }

    pub fn poll_finished(&self, outcome: &'static str, duration: Duration) {
        self.counter(METADATA_POLLS_TOTAL, vec![Label::new("outcome", outcome)])
            .increment(1);
        self.recorder
            .register_histogram(&Key::from_name(METADATA_POLL_DURATION_SECONDS), &METADATA)
            .record(duration.as_secs_f64());
    }

    pub fn node_action(&self, action: &'static str, outcome: &'static str) {
        self.counter(
            NODE_ACTIONS_TOTAL,
            vec![Label::new("action", action), Label::new("outcome", outcome)],
        )
        .increment(1);
    }

    pub fn cordoned_after(&self, seconds: f64) {
        self.recorder
            .register_histogram(&Key::from_name(NOTICE_TO_CORDON_SECONDS), &METADATA)
            .record(seconds.max(0.0));
    }

    pub fn subscribers(&self, count: usize) {
        self.recorder
            .register_gauge(&Key::from_name(SUBSCRIBERS), &METADATA)
            .set(count as f64);
    }

    /// Folds recorded histogram samples into their buckets; called periodically so samples do
    /// not pile up between scrapes.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
