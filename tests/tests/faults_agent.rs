//! Fault injection for "never blocked": the real `nerve-agent` binary while its metadata
//! service misbehaves or disappears, while the API server fails every way it can, and with 500
//! stream subscribers at once.
//!
//! Each scenario asks the same two questions: does the agent keep running and recover on its
//! own, and does a notice that appears afterwards still reach subscribers (and the node) in
//! time? Faults already covered by `tests/tests/agent.rs` (each fault counted by outcome, the
//! API server down, one 409) are not repeated here; see `docs/faults.md`.

// Test helpers outside #[test] functions: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use nerve_notice::StreamEvent;
use nerve_tests::agent_process::{AgentProcess, METADATA_TIMEOUT, metric_value, spot_id};
use nerve_tests::apiserver::ApiServer;
use nerve_tests::imds::{Fault, MetadataSimulator, TokenPolicy};
use serde_json::json;
use time::OffsetDateTime;

/// Polling interval the agents under test use.
const POLL: Duration = Duration::from_millis(200);
/// Hang timeout on a wait for a notice: a wait that ends early costs nothing. Only a hung agent
/// runs into it; how fast the notice came is checked against [`RECOVERY`].
const SLACK: Duration = Duration::from_secs(10);
/// Scheduling delay a process may see on a loaded 2-core machine.
const SCHEDULING: Duration = Duration::from_secs(1);
/// How soon after a fault ends (or a storm starts) a new notice must reach a subscriber: the
/// poll in flight may still run into its metadata timeout, the next poll finds the notice, plus
/// scheduling delay. A few polls.
const RECOVERY: Duration = METADATA_TIMEOUT
    .saturating_add(POLL)
    .saturating_add(SCHEDULING);
/// Bound for anything that takes a few retries (cordons after the API server recovers).
const WAIT: Duration = Duration::from_secs(60);
/// DESIGN.md: the agent stays under 50 MiB of memory at all times.
const AGENT_MEMORY_LIMIT_KIB: u64 = 50 * 1024;
const SUBSCRIBERS: usize = 500;
const NODE: &str = "gpu-node-7";

/// Starts the agent polling `metadata_url` every [`POLL`]. With `api`, Kubernetes mode for
/// [`NODE`].
fn start_agent(metadata_url: &str, api: Option<&ApiServer>) -> AgentProcess {
    AgentProcess::start(metadata_url, api, NODE, POLL, WAIT, &[])
}

/// A distinct spot-interruption deadline per round (the notice id is kind plus deadline).
fn deadline(round: u64) -> OffsetDateTime {
    (OffsetDateTime::now_utc() + Duration::from_secs(120 + round))
        .replace_nanosecond(0)
        .unwrap()
}

/// How long a fault lasts in CI; `bench/soak` sets minutes with NERVE_OUTAGE_SECS.
fn outage() -> Duration {
    std::env::var("NERVE_OUTAGE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(2))
}

#[tokio::test]
async fn after_every_metadata_fault_and_an_outage_the_next_notice_reaches_subscribers_within_a_few_polls()
 {
    let mut sim = MetadataSimulator::start();
    sim.set_token_policy(TokenPolicy::Required);
    let addr = sim.addr();
    let mut agent = start_agent(&sim.url(), None);
    agent.wait_ready().await;
    let mut watch = agent.watch().await;
    assert!(matches!(
        watch.next_within(WAIT).await,
        Some(StreamEvent::Snapshot { .. })
    ));

    let faults = [
        "garbage bodies",
        "500s",
        "hangs",
        "resets",
        "tokens refused",
        "service gone",
    ];
    for (round, fault) in faults.into_iter().enumerate() {
        match fault {
            "garbage bodies" => sim.set_fault(Fault::Garbage),
            "500s" => sim.set_fault(Fault::ServerError),
            "hangs" => sim.set_fault(Fault::Hang),
            "resets" => sim.set_fault(Fault::Reset),
            "tokens refused" => {
                sim.set_token_policy(TokenPolicy::Refuse(403));
                sim.expire_tokens();
            }
            _ => {}
        }
        if fault == "service gone" {
            // Nothing listens on the metadata port for a while.
            drop(sim);
            tokio::time::sleep(outage()).await;
            agent.assert_running();
            sim = MetadataSimulator::start_on(addr).expect("metadata service back on its port");
            sim.set_token_policy(TokenPolicy::Required);
        } else {
            tokio::time::sleep(outage()).await;
            agent.assert_running();
            sim.set_fault(Fault::None);
            sim.set_token_policy(TokenPolicy::Required);
        }
        let deadline = deadline(round as u64);
        sim.set_spot_interruption("terminate", deadline);
        let took = watch.expect_notice(&spot_id(deadline), POLL + SLACK).await;
        eprintln!("after {fault}: notice reached the subscriber {took:?} after it appeared");
        assert!(
            took <= RECOVERY,
            "after {fault} the notice took {took:?}, more than the {RECOVERY:?} of a few polls"
        );
        sim.clear_spot_interruption();
        assert_eq!(agent.get("/healthz").await.map(|r| r.0), Some(200));
    }
    agent.assert_running();
}

/// Failed answers per storm: more than the agent's conflict retries (5), few enough that its
/// capped backoff (5 s) gets through them within [`WAIT`] on a loaded machine.
const STORM: usize = 8;
/// The agent's retries of a failing node action double from 200 ms up to 5 s, with jitter down
/// to half: by the last of [`STORM`] failures it waits at least 2.5 s. A pace this much faster
/// means it hammers an API server that is already failing.
const BACKED_OFF: Duration = Duration::from_secs(1);

/// One API-server storm against a fresh agent: the notice streams at once, the cordon lands
/// once the storm is over, and the storm broke nothing on the way.
async fn ride_out_storm(status: u16, method: Option<&str>, what: &str) {
    let sim = MetadataSimulator::start();
    let api = ApiServer::start(NODE);
    let mut agent = start_agent(&sim.url(), Some(&api));
    agent.wait_ready().await;
    let mut watch = agent.watch().await;
    watch.next_within(WAIT).await;
    let before_storm = api.requests().len();
    api.fail_next(method, "/nodes/", status, STORM);
    let deadline = deadline(0);
    sim.set_spot_interruption("terminate", deadline);
    let took = watch.expect_notice(&spot_id(deadline), POLL + SLACK).await;
    assert!(
        took <= RECOVERY,
        "{what}: the notice took {took:?} to stream; node writes must not hold it up"
    );
    assert!(
        api.wait_until(WAIT, |api| api.unschedulable()).await,
        "{what}: the cordon never landed; log:\n{}",
        agent.log()
    );
    assert_eq!(
        api.pending_failures(),
        0,
        "{what}: the storm was not used up"
    );

    // The node is exactly as one clean cordon leaves it: one taint, both annotations, one event.
    assert_eq!(
        api.taints(),
        vec![
            json!({"key": "nerve.io/interruption", "value": "spot-interruption", "effect": "NoSchedule"})
        ],
        "{what}"
    );
    let annotations = api.annotations();
    assert_eq!(annotations["nerve.io/cordoned-by"], "nerve", "{what}");
    let annotated: nerve_notice::Notice =
        serde_json::from_str(annotations["nerve.io/notice"].as_str().unwrap()).unwrap();
    assert_eq!(annotated.id, spot_id(deadline), "{what}");
    assert!(
        api.wait_until(WAIT, |api| !api.events().is_empty()).await,
        "{what}: no event"
    );
    let events = api.events();
    assert_eq!(
        events.len(),
        1,
        "{what}: one event, not one per attempt: {events:?}"
    );

    let node_requests: Vec<_> = api
        .requests()
        .into_iter()
        .skip(before_storm)
        .filter(|r| r.path.contains("/nodes/"))
        .collect();
    // Every retried PATCH is built from a fresh read: a stale one would conflict forever.
    for pair in node_requests.windows(2) {
        assert!(
            !(pair[0].method == "PATCH" && pair[1].method == "PATCH"),
            "{what}: a PATCH retried without reading the node again"
        );
    }
    if method.is_none() {
        // Every request fails: each failure is one attempt, and the attempts slow down.
        let failed: Vec<_> = node_requests.iter().take(STORM).map(|r| r.at).collect();
        let last_gap = failed[STORM - 1] - failed[STORM - 2];
        assert!(
            last_gap >= BACKED_OFF,
            "{what}: {last_gap:?} between the last two failed attempts; the agent does not back off"
        );
    }
    eprintln!(
        "{what}: notice streamed after {took:?}; cordon landed after {} node requests",
        node_requests.len()
    );
    agent.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_stream_through_api_server_storms_and_the_cordon_lands_when_it_recovers() {
    // Side by side: each storm mostly waits out the agent's backoff.
    tokio::join!(
        ride_out_storm(500, None, "500s on every call"),
        ride_out_storm(409, Some("PATCH"), "a storm of 409 conflicts"),
        ride_out_storm(429, None, "429 throttling"),
    );
}

#[tokio::test]
async fn a_notice_during_the_backoff_of_a_failed_startup_uncordon_still_cordons_the_node() {
    // On start the agent undoes a cordon it may have left; the API server fails that, and the
    // notice arrives while the agent waits to retry. The cordon must still land.
    let sim = MetadataSimulator::start();
    let api = ApiServer::start(NODE);
    // Fails until told otherwise, so it is still failing when the notice arrives.
    api.fail_next(Some("GET"), "/nodes/", 500, usize::MAX);
    let agent = start_agent(&sim.url(), Some(&api));
    agent.wait_ready().await;
    let mut watch = agent.watch().await;
    watch.next_within(WAIT).await;
    assert!(
        api.wait_until(WAIT, |api| !api.requests().is_empty()).await,
        "the startup uncordon reads the node"
    );
    let deadline = deadline(0);
    sim.set_spot_interruption("terminate", deadline);
    watch.expect_notice(&spot_id(deadline), POLL + SLACK).await;
    // The agent turns to the notice while the API server still fails: it reads the node again.
    let seen = api.requests().len();
    assert!(
        api.wait_until(WAIT, |api| api.requests().len() > seen)
            .await,
        "the agent stopped trying after the notice; log:\n{}",
        agent.log()
    );
    assert!(api.writes().is_empty(), "{:?}", api.writes());
    api.clear_failures();
    assert!(
        api.wait_until(WAIT, |api| api.unschedulable()).await,
        "the cordon never landed; log:\n{}",
        agent.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_subscribers_all_get_the_notice_and_the_agent_stays_under_its_memory_limit() {
    let sim = MetadataSimulator::start();
    let agent = start_agent(&sim.url(), None);
    agent.wait_ready().await;
    let mut watches = Vec::with_capacity(SUBSCRIBERS);
    for _ in 0..SUBSCRIBERS {
        let mut watch = agent.watch().await;
        assert!(matches!(
            watch.next_within(WAIT).await,
            Some(StreamEvent::Snapshot { .. })
        ));
        watches.push(watch);
    }
    let (status, metrics) = agent.get("/metrics").await.unwrap();
    assert_eq!(status, 200);
    let subscribers = metric_value(&metrics, "nerve_agent_subscribers ");
    assert_eq!(subscribers as usize, SUBSCRIBERS);

    let deadline = deadline(0);
    let id = spot_id(deadline);
    sim.set_spot_interruption("terminate", deadline);
    let started = Instant::now();
    let reads = watches.into_iter().map(|mut watch| {
        let id = id.clone();
        tokio::spawn(async move { watch.expect_notice(&id, POLL + SLACK).await })
    });
    let mut slowest = Duration::ZERO;
    for read in reads {
        slowest = slowest.max(read.await.expect("subscriber task"));
    }
    let peak = agent.peak_rss_kib();
    eprintln!(
        "{SUBSCRIBERS} subscribers: all had the notice {:?} after it appeared (slowest {slowest:?}); \
         agent peak RSS (VmHWM) {peak} KiB",
        started.elapsed()
    );
    assert!(
        peak < AGENT_MEMORY_LIMIT_KIB,
        "agent peak RSS {peak} KiB is over its {AGENT_MEMORY_LIMIT_KIB} KiB limit"
    );
}
