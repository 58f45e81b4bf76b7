//! End to end: the real `nerve-agent` binary against the metadata simulator and the API-server
//! stand-in, over real sockets.

// Test helpers outside #[test] functions: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use nerve_notice::{Cloud, Notice, NoticeKind, StreamEvent};
use nerve_tests::agent_process::{AgentProcess, metric_value, spot_id, wait_for};
use nerve_tests::apiserver::ApiServer;
use nerve_tests::imds::{Fault, MaintenanceEvent, MetadataSimulator, TokenPolicy};
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Generous bound for anything the agent should do "within a few polls": the test machine may be
/// loaded, and a wait that ends early costs nothing.
const WAIT: Duration = Duration::from_secs(30);
const NODE: &str = "gpu-node-1";
/// Polling interval of the agents under test: short, so tests see several polls quickly.
const POLL: Duration = Duration::from_millis(100);

/// Starts the agent polling `sim` every [`POLL`]. With `api`, Kubernetes mode for [`NODE`].
fn start_agent(sim: &MetadataSimulator, api: Option<&ApiServer>, extra: &[&str]) -> AgentProcess {
    AgentProcess::start(&sim.url(), api, NODE, POLL, WAIT, extra)
}

fn in_two_minutes() -> OffsetDateTime {
    (OffsetDateTime::now_utc() + Duration::from_secs(120))
        .replace_nanosecond(0)
        .unwrap()
}

#[tokio::test]
async fn streams_a_notice_once_and_late_subscribers_get_it_in_the_snapshot() {
    let sim = MetadataSimulator::start();
    let agent = start_agent(&sim, None, &[]);
    agent.wait_ready().await;
    let mut early = agent.watch().await;
    assert_eq!(
        early.next().await,
        StreamEvent::Snapshot { notices: vec![] }
    );

    let deadline = in_two_minutes();
    sim.set_spot_interruption("terminate", deadline);
    let StreamEvent::Notice { notice } = early.next().await else {
        panic!("expected a notice line");
    };
    assert_eq!(notice.kind, NoticeKind::SpotInterruption);
    assert_eq!(notice.action, "terminate");
    assert_eq!(notice.deadline, deadline);
    assert_eq!(notice.id, spot_id(deadline));

    let mut late = agent.watch().await;
    assert_eq!(
        late.next().await,
        StreamEvent::Snapshot {
            notices: vec![notice.clone()]
        }
    );
    assert_eq!(agent.active_notices().await.len(), 1);

    // Many more polls see the same notice: it is still one notice.
    let polls = agent
        .metric("nerve_agent_metadata_polls_total{outcome=\"ok\"}")
        .await;
    assert!(
        wait_for(WAIT, || async {
            agent
                .metric("nerve_agent_metadata_polls_total{outcome=\"ok\"}")
                .await
                >= polls + 10.0
        })
        .await
    );
    assert_eq!(
        agent
            .metric("nerve_agent_notices_total{kind=\"spot-interruption\"}")
            .await,
        1.0
    );
    let metrics = agent.metrics().await;
    for name in [
        "nerve_agent_notices_total",
        "nerve_agent_metadata_polls_total",
        "nerve_agent_metadata_poll_duration_seconds",
        "nerve_agent_subscribers",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }
    assert_eq!(metric_value(&metrics, "nerve_agent_subscribers"), 2.0);

    // Heartbeats keep a quiet stream alive.
    let heartbeat = tokio::time::timeout(WAIT, async {
        loop {
            let line = late.next_line().await;
            if line.trim_end() == r#"{"type":"heartbeat"}"# {
                return;
            }
        }
    })
    .await;
    assert!(heartbeat.is_ok(), "no heartbeat within {WAIT:?}");
    assert_eq!(agent.get("/healthz").await.unwrap().0, 200);
}

/// The stuck subscriber's socket: the smallest receive buffer and segment size Linux allows, so
/// the agent's side of it fills after ~100 KiB (loopback defaults hold megabytes: measured 3-4
/// MiB with the default segment size).
const STUCK_RECEIVE_BUFFER: u32 = 4096;
const STUCK_SEGMENT_SIZE: u32 = 536;
/// Healthy subscribers next to the stuck one.
const HEALTHY: usize = 200;
/// Notices per burst: under the agent's 32-line subscriber queue, so a subscriber that reads
/// between bursts is never taken for a stuck one.
const BURST: usize = 16;
/// Length of each notice's maintenance code: a burst of [`BURST`] events stays under the
/// metadata client's 64 KiB answer limit and pushes ~50 KiB down every stream.
const CODE_LEN: usize = 3000;
/// Bursts before the stuck subscriber must be gone: its kernel buffers (~100 KiB), hyper's 16
/// queued writes and the agent's 32-line queue take about 80 notices, 5 bursts.
const MAX_BURSTS: usize = 20;
/// A burst (or a notice) must reach all healthy subscribers this soon after it appeared: one
/// poll, the agent writing 200 sockets, and this test reading 200 × 16 lines of 3 KiB in a
/// debug build on a loaded 2-core machine. A subscriber held up by the stuck one would wait
/// until it was dropped, bursts later.
const HEALTHY_LATENCY: Duration = Duration::from_secs(5);

/// A subscriber that asks for the stream and never reads a byte.
async fn stuck_subscriber(agent: &AgentProcess) -> TcpStream {
    use nix::sys::socket::{setsockopt, sockopt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(STUCK_RECEIVE_BUFFER).unwrap();
    // Before connecting: the segment size is announced in the SYN and sizes the agent's buffers.
    setsockopt(&socket, sockopt::TcpMaxSeg, &STUCK_SEGMENT_SIZE).unwrap();
    let mut stuck = socket.connect(agent.addr()).await.unwrap();
    stuck
        .write_all(b"GET /v1/notices?watch=true HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    stuck
}

/// `count` scheduled-maintenance events, distinct from every other call's by `first`.
fn maintenance_burst(first: usize, count: usize) -> Vec<MaintenanceEvent> {
    (first..first + count)
        .map(|n| MaintenanceEvent {
            code: format!("system-maintenance-{n}-{}", "x".repeat(CODE_LEN)),
            event_id: format!("instance-event-{n}"),
            not_before: in_two_minutes() + Duration::from_secs(3600 + n as u64),
            state: "active".into(),
        })
        .collect()
}

#[tokio::test]
async fn a_stuck_subscriber_does_not_delay_hundreds_of_healthy_ones() {
    let sim = MetadataSimulator::start();
    let agent = start_agent(&sim, None, &[]);
    agent.wait_ready().await;
    let stuck = stuck_subscriber(&agent).await;
    let mut healthy = Vec::new();
    for _ in 0..HEALTHY {
        let mut watch = agent.watch().await;
        assert!(matches!(watch.next().await, StreamEvent::Snapshot { .. }));
        healthy.push(watch);
    }
    let subscribers = || async { agent.metric("nerve_agent_subscribers").await as usize };
    assert!(wait_for(WAIT, || async { subscribers().await == HEALTHY + 1 }).await);

    // Bursts of notices until the stuck subscriber's buffers are full and the agent drops it;
    // every burst reaches every healthy subscriber meanwhile.
    let mut bursts = 0;
    while subscribers().await > HEALTHY {
        assert!(
            bursts < MAX_BURSTS,
            "the stuck subscriber is still there after {bursts} bursts of {BURST} notices"
        );
        sim.set_scheduled_maintenance(maintenance_burst(bursts * BURST, BURST));
        let appeared = Instant::now();
        for watch in &mut healthy {
            for _ in 0..BURST {
                let event = watch.next_within(HEALTHY_LATENCY).await;
                assert!(
                    matches!(event, Some(StreamEvent::Notice { .. })),
                    "burst {bursts}: a healthy subscriber got {event:?} within {HEALTHY_LATENCY:?}"
                );
            }
        }
        let took = appeared.elapsed();
        assert!(
            took <= HEALTHY_LATENCY,
            "burst {bursts} took {took:?} to reach {HEALTHY} healthy subscribers"
        );
        bursts += 1;
    }
    assert_eq!(
        subscribers().await,
        HEALTHY,
        "only the stuck subscriber was dropped"
    );
    assert!(
        agent
            .log()
            .contains("dropping a watch subscriber that stopped reading")
    );

    sim.set_spot_interruption("terminate", in_two_minutes());
    let appeared = Instant::now();
    for watch in &mut healthy {
        let event = watch.next_within(HEALTHY_LATENCY).await;
        assert!(
            matches!(event, Some(StreamEvent::Notice { ref notice }) if notice.kind == NoticeKind::SpotInterruption),
            "{event:?}"
        );
    }
    assert!(
        appeared.elapsed() <= HEALTHY_LATENCY,
        "{:?}",
        appeared.elapsed()
    );
    eprintln!(
        "stuck subscriber dropped after {bursts} bursts of {BURST} notices of ~{CODE_LEN} B; the \
         spot notice reached {HEALTHY} healthy subscribers in {:?}",
        appeared.elapsed()
    );
    drop(stuck);
}

#[tokio::test]
async fn uses_one_imds_token_across_many_polls_and_renews_it_after_a_401() {
    let sim = MetadataSimulator::start();
    sim.set_token_policy(TokenPolicy::Required);
    let agent = start_agent(&sim, None, &[]);
    agent.wait_ready().await;
    assert!(wait_for(WAIT, || async { sim.requests() > 100 }).await);
    assert_eq!(sim.token_puts(), 1, "one token PUT for many polls");
    assert_eq!(sim.tokenless_gets(), 0, "never IMDSv1 when tokens work");

    sim.expire_tokens();
    assert!(wait_for(WAIT, || async { sim.token_puts() == 2 }).await);
    let requests = sim.requests();
    assert!(wait_for(WAIT, || async { sim.requests() > requests + 40 }).await);
    assert_eq!(sim.token_puts(), 2);
    sim.set_spot_interruption("terminate", in_two_minutes());
    assert!(wait_for(WAIT, || async { agent.active_notices().await.len() == 1 }).await);
}

#[tokio::test]
async fn falls_back_to_imdsv1_only_when_token_puts_are_refused() {
    let sim = MetadataSimulator::start();
    sim.set_token_policy(TokenPolicy::Refuse(405));
    let agent = start_agent(&sim, None, &[]);
    agent.wait_ready().await;
    sim.set_spot_interruption("terminate", in_two_minutes());
    assert!(wait_for(WAIT, || async { agent.active_notices().await.len() == 1 }).await);
    assert!(sim.tokenless_gets() > 0);
    assert_eq!(
        agent.log().matches("falling back to IMDSv1").count(),
        1,
        "logged once"
    );

    // A token service that fails (500) is a failure, never a downgrade.
    let sim = MetadataSimulator::start();
    sim.set_token_policy(TokenPolicy::Refuse(500));
    let agent = start_agent(&sim, None, &[]);
    assert!(
        wait_for(WAIT, || async {
            agent
                .metric("nerve_agent_metadata_polls_total{outcome=\"http_5xx\"}")
                .await
                >= 5.0
        })
        .await
    );
    assert_eq!(sim.tokenless_gets(), 0);
}

#[tokio::test]
async fn counts_every_fault_by_outcome_keeps_polling_and_does_not_flood_the_log() {
    let sim = MetadataSimulator::start();
    let agent = start_agent(&sim, None, &[]);
    agent.wait_ready().await;
    for (fault, outcome) in [
        (Fault::ServerError, "http_5xx"),
        (Fault::Garbage, "unparseable"),
        (Fault::Reset, "connection"),
        (Fault::Hang, "timeout"),
    ] {
        sim.set_fault(fault);
        let series = format!("nerve_agent_metadata_polls_total{{outcome=\"{outcome}\"}}");
        assert!(
            wait_for(WAIT, || async { agent.metric(&series).await >= 3.0 }).await,
            "{outcome} never counted; log:\n{}",
            agent.log()
        );
    }
    sim.set_fault(Fault::None);
    sim.set_spot_interruption("terminate", in_two_minutes());
    assert!(wait_for(WAIT, || async { agent.active_notices().await.len() == 1 }).await);
    let log = agent.log();
    let failures = log.matches("metadata poll failed").count();
    assert!(
        (4..=8).contains(&failures),
        "one line per change of cause, not one per poll ({failures}):\n{log}"
    );
}

#[tokio::test]
async fn detects_every_aws_kind_and_gcp_and_azure_preemption() {
    let sim = MetadataSimulator::start();
    let aws = start_agent(&sim, None, &[]);
    aws.wait_ready().await;
    sim.set_rebalance_recommendation(OffsetDateTime::now_utc());
    sim.set_scheduled_maintenance(vec![
        MaintenanceEvent {
            code: "system-reboot".into(),
            event_id: "instance-event-1".into(),
            not_before: in_two_minutes() + Duration::from_secs(3600),
            state: "active".into(),
        },
        MaintenanceEvent {
            code: "instance-stop".into(),
            event_id: "instance-event-2".into(),
            not_before: in_two_minutes(),
            state: "canceled".into(),
        },
    ]);
    sim.set_asg_lifecycle_state(Some("Terminated"));
    sim.set_spot_interruption("hibernate", in_two_minutes());
    assert!(wait_for(WAIT, || async { aws.active_notices().await.len() == 4 }).await);
    let kinds: Vec<String> = aws
        .active_notices()
        .await
        .iter()
        .map(|n| n["kind"].as_str().unwrap().to_owned())
        .collect();
    for kind in [
        "spot-interruption",
        "rebalance-recommendation",
        "scheduled-maintenance",
        "asg-termination",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} missing: {kinds:?}");
    }

    let gcp = start_agent(&sim, None, &["--cloud", "gcp"]);
    sim.set_gcp_preempted(true);
    assert!(wait_for(WAIT, || async { gcp.active_notices().await.len() == 1 }).await);
    let notice = &gcp.active_notices().await[0];
    assert_eq!(notice["kind"], "preemption");
    assert_eq!(notice["source"], "gcp");

    let azure = start_agent(&sim, None, &["--cloud", "azure"]);
    sim.set_azure_preempt_for_other_vm(true);
    sim.set_azure_preempt(Some(in_two_minutes()));
    let polls = "nerve_agent_metadata_polls_total{outcome=\"ok\"}";
    assert!(wait_for(WAIT, || async { azure.metric(polls).await >= 5.0 }).await);
    assert!(
        azure.active_notices().await.is_empty(),
        "an event for another VM is not ours"
    );
    sim.set_azure_preempt_for_other_vm(false);
    assert!(wait_for(WAIT, || async { azure.active_notices().await.len() == 1 }).await);
    let notice = &azure.active_notices().await[0];
    assert_eq!(notice["kind"], "preemption");
    assert_eq!(notice["source"], "azure");
}

/// The node as the tests start it: schedulable, with a GPU taint someone else owns.
fn gpu_taint() -> Value {
    json!({"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"})
}

fn nerve_taint(kind: &str) -> Value {
    json!({"key": "nerve.io/interruption", "value": kind, "effect": "NoSchedule"})
}

fn start_api() -> ApiServer {
    let api = ApiServer::start(NODE);
    api.update_node(|node| node["spec"]["taints"] = json!([gpu_taint()]));
    api
}

#[tokio::test]
async fn cordons_taints_annotates_and_records_an_event_with_one_exact_patch() {
    let sim = MetadataSimulator::start();
    let api = start_api();
    let agent = start_agent(&sim, Some(&api), &[]);
    agent.wait_ready().await;
    let mut watch = agent.watch().await;
    watch.next().await;
    let version = api.resource_version();
    let deadline = in_two_minutes();
    // Notice times carry milliseconds.
    let set_at = OffsetDateTime::now_utc() - Duration::from_millis(1);
    sim.set_spot_interruption("terminate", deadline);
    assert!(
        api.wait_until(WAIT, |api| !api.events().is_empty()).await,
        "log:\n{}",
        agent.log()
    );
    let StreamEvent::Notice { notice: streamed } = watch.next().await else {
        panic!("expected the notice on the stream");
    };

    let writes = api.writes();
    let patch = &writes[0];
    assert_eq!(patch.method, "PATCH");
    assert!(
        patch.path.starts_with(&format!("/api/v1/nodes/{NODE}?")),
        "{}",
        patch.path
    );
    assert!(
        patch.path.contains("fieldManager=nerve-agent"),
        "{}",
        patch.path
    );
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    let body = patch.json();
    let notice_json = body["metadata"]["annotations"]["nerve.io/notice"]
        .as_str()
        .unwrap()
        .to_owned();
    // The annotation is the notice, every field of it, exactly as the stream sent it.
    let annotated: Notice = serde_json::from_str(&notice_json).unwrap();
    assert_eq!(annotated, streamed);
    assert_eq!(annotated.id, spot_id(deadline));
    assert_eq!(annotated.kind, NoticeKind::SpotInterruption);
    assert_eq!(annotated.action, "terminate");
    assert_eq!(annotated.deadline, deadline);
    assert_eq!(annotated.source, Cloud::Aws);
    assert!(
        set_at <= annotated.detected_at && annotated.detected_at <= OffsetDateTime::now_utc(),
        "detected at {} (notice set at {set_at})",
        annotated.detected_at
    );
    assert_eq!(
        body,
        json!({
            "metadata": {
                "resourceVersion": version.to_string(),
                "annotations": {"nerve.io/cordoned-by": "nerve", "nerve.io/notice": notice_json},
            },
            "spec": {"unschedulable": true, "taints": [gpu_taint(), nerve_taint("spot-interruption")]},
        })
    );
    assert!(api.unschedulable());
    assert_eq!(
        api.taints(),
        vec![gpu_taint(), nerve_taint("spot-interruption")]
    );
    let event = &api.events()[0];
    assert_eq!(event["involvedObject"]["kind"], "Node");
    assert_eq!(event["involvedObject"]["name"], NODE);
    assert_eq!(event["reason"], "InterruptionNotice");
    assert_eq!(writes[1].method, "POST");
    assert!(
        writes[1]
            .path
            .starts_with("/api/v1/namespaces/default/events")
    );

    // Many more polls of the same notice write nothing more.
    let requests = sim.requests();
    assert!(wait_for(WAIT, || async { sim.requests() > requests + 40 }).await);
    assert_eq!(api.writes().len(), 2, "{:?}", api.writes());
    assert!(
        agent
            .metric("nerve_agent_node_actions_total{action=\"cordon\",outcome=\"ok\"}")
            .await
            == 1.0
    );
    assert!(
        agent
            .metrics()
            .await
            .contains("nerve_agent_notice_to_cordon_seconds_count 1")
    );
}

#[tokio::test]
async fn keeps_a_taint_added_concurrently_when_the_patch_conflicts() {
    let sim = MetadataSimulator::start();
    let api = start_api();
    let agent = start_agent(&sim, Some(&api), &[]);
    agent.wait_ready().await;
    let added = json!({"key": "team", "value": "ml", "effect": "PreferNoSchedule"});
    let change = added.clone();
    api.change_node_before_next_write(move |node| {
        node["spec"]["taints"].as_array_mut().unwrap().push(change);
    });
    sim.set_spot_interruption("terminate", in_two_minutes());
    assert!(
        api.wait_until(WAIT, |api| api.unschedulable()).await,
        "log:\n{}",
        agent.log()
    );
    let patches: Vec<_> = api
        .writes()
        .into_iter()
        .filter(|w| w.method == "PATCH")
        .collect();
    assert_eq!(patches.len(), 2, "the conflicting patch is retried once");
    assert_eq!(
        api.taints(),
        vec![gpu_taint(), added, nerve_taint("spot-interruption")]
    );
    assert!(
        wait_for(WAIT, || async {
            agent
                .metric("nerve_agent_node_actions_total{action=\"cordon\",outcome=\"conflict\"}")
                .await
                == 1.0
        })
        .await
    );
}

#[tokio::test]
async fn keeps_a_taint_added_concurrently_when_the_uncordon_conflicts() {
    let sim = MetadataSimulator::start();
    let api = start_api();
    let agent = start_agent(&sim, Some(&api), &[]);
    agent.wait_ready().await;
    sim.set_spot_interruption("terminate", in_two_minutes());
    assert!(
        api.wait_until(WAIT, |api| api.unschedulable()).await,
        "log:\n{}",
        agent.log()
    );
    // Someone taints the node between the agent's read and its uncordon patch: an
    // unconditional patch would write back the taints it read and lose this one.
    let added = json!({"key": "team", "value": "ml", "effect": "NoSchedule"});
    let change = added.clone();
    api.change_node_before_next_write(move |node| {
        node["spec"]["taints"].as_array_mut().unwrap().push(change);
    });
    let patches = |api: &ApiServer| api.writes().iter().filter(|w| w.method == "PATCH").count();
    let cordon_patches = patches(&api);
    sim.clear_spot_interruption();
    assert!(
        api.wait_until(WAIT, |api| !api.unschedulable()).await,
        "log:\n{}",
        agent.log()
    );
    assert_eq!(api.taints(), vec![gpu_taint(), added]);
    assert_eq!(
        patches(&api) - cordon_patches,
        2,
        "the conflicting uncordon is read again and retried once"
    );
    assert!(api.annotations().get("nerve.io/cordoned-by").is_none());
    assert!(
        wait_for(WAIT, || async {
            agent
                .metric("nerve_agent_node_actions_total{action=\"uncordon\",outcome=\"conflict\"}")
                .await
                == 1.0
        })
        .await
    );
}

#[tokio::test]
async fn passive_mode_streams_the_notice_and_writes_nothing() {
    let sim = MetadataSimulator::start();
    let api = start_api();
    let agent = start_agent(&sim, Some(&api), &["--passive", "--drain"]);
    agent.wait_ready().await;
    let mut watch = agent.watch().await;
    watch.next().await;
    api.add_pod(api.pod_on_node("default", "web", "web"));
    sim.set_spot_interruption("terminate", in_two_minutes());
    assert!(matches!(watch.next().await, StreamEvent::Notice { .. }));
    let requests = sim.requests();
    assert!(wait_for(WAIT, || async { sim.requests() > requests + 40 }).await);
    assert!(api.writes().is_empty(), "{:?}", api.writes());
    assert!(!api.unschedulable());
}

#[tokio::test]
async fn undoes_only_its_own_cordon_when_the_notice_disappears() {
    let sim = MetadataSimulator::start();
    let api = start_api();
    let agent = start_agent(
        &sim,
        Some(&api),
        &["--cordon-on", "rebalance-recommendation"],
    );
    agent.wait_ready().await;
    sim.set_rebalance_recommendation(OffsetDateTime::now_utc());
    assert!(api.wait_until(WAIT, |api| api.unschedulable()).await);
    // Someone adds a taint of their own meanwhile.
    let added = json!({"key": "team", "value": "ml", "effect": "NoSchedule"});
    let change = added.clone();
    api.update_node(move |node| node["spec"]["taints"].as_array_mut().unwrap().push(change));
    sim.clear_rebalance_recommendation();
    assert!(
        api.wait_until(WAIT, |api| !api.unschedulable()).await,
        "log:\n{}",
        agent.log()
    );
    assert_eq!(api.taints(), vec![gpu_taint(), added]);
    assert!(api.annotations().get("nerve.io/cordoned-by").is_none());
    assert!(api.annotations().get("nerve.io/notice").is_none());

    // A node someone else cordoned stays cordoned; only the agent's taint goes.
    api.update_node(|node| node["spec"]["unschedulable"] = json!(true));
    sim.set_rebalance_recommendation(OffsetDateTime::now_utc());
    assert!(
        api.wait_until(WAIT, |api| api
            .taints()
            .contains(&nerve_taint("rebalance-recommendation")))
            .await
    );
    assert!(api.annotations().get("nerve.io/cordoned-by").is_none());
    sim.clear_rebalance_recommendation();
    assert!(
        api.wait_until(WAIT, |api| !api
            .taints()
            .contains(&nerve_taint("rebalance-recommendation")))
            .await
    );
    assert!(api.unschedulable(), "someone else's cordon is never undone");
}

#[tokio::test]
async fn a_restart_keeps_a_live_cordon_untouched_and_undoes_one_after_a_false_alarm() {
    let sim = MetadataSimulator::start();
    let api = start_api();
    let first = start_agent(&sim, Some(&api), &[]);
    first.wait_ready().await;
    sim.set_spot_interruption("terminate", in_two_minutes());
    assert!(api.wait_until(WAIT, |api| api.events().len() == 1).await);
    drop(first);

    // Restarted with the notice still there: nothing to write.
    let writes = api.writes().len();
    let second = start_agent(&sim, Some(&api), &[]);
    second.wait_ready().await;
    let requests = sim.requests();
    assert!(wait_for(WAIT, || async { sim.requests() > requests + 40 }).await);
    assert_eq!(api.writes().len(), writes, "{:?}", api.writes());
    drop(second);

    // The notice went away while no agent ran: the next one undoes the cordon.
    sim.clear_spot_interruption();
    let third = start_agent(&sim, Some(&api), &[]);
    third.wait_ready().await;
    assert!(
        api.wait_until(WAIT, |api| !api.unschedulable()).await,
        "log:\n{}",
        third.log()
    );
    assert_eq!(api.taints(), vec![gpu_taint()]);
}

#[tokio::test]
async fn streams_at_once_while_the_api_server_is_down_and_cordons_when_it_is_back() {
    let sim = MetadataSimulator::start();
    let api = start_api();
    let agent = start_agent(&sim, Some(&api), &[]);
    agent.wait_ready().await;
    let mut watch = agent.watch().await;
    watch.next().await;
    api.set_unavailable(true);
    sim.set_spot_interruption("terminate", in_two_minutes());
    assert!(matches!(watch.next().await, StreamEvent::Notice { .. }));
    assert!(
        api.wait_until(WAIT, |api| api.requests().len() >= 3).await,
        "the agent keeps retrying"
    );
    assert!(!api.unschedulable());
    // Back, but failing the first two patches with 500: still retried.
    api.fail_next(Some("PATCH"), "/api/v1/nodes/", 500, 2);
    api.set_unavailable(false);
    assert!(
        api.wait_until(WAIT, |api| api.unschedulable()).await,
        "log:\n{}",
        agent.log()
    );
    let patches = api.writes().iter().filter(|w| w.method == "PATCH").count();
    assert_eq!(patches, 3, "two refused with 500, the third applied");
}

/// The Retry-After of the disruption budget in the drain test: longer than the agent's 1 s retry
/// of an eviction refused without one, so the gap shows which of the two the agent waited.
const WEB_RETRY_AFTER: Duration = Duration::from_secs(3);
/// The agent's cap on one Retry-After (agent/src/node/drain.rs): the notice deadline is at most
/// minutes away, so a budget asking for an hour is asked again after this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);
/// Lateness allowed on a retry at the cap on a loaded 2-core machine.
const RETRY_SLACK: Duration = Duration::from_secs(5);

#[tokio::test]
async fn drains_with_evictions_honouring_budgets_and_skipping_node_and_checkpointing_pods() {
    let sim = MetadataSimulator::start();
    let api = start_api();
    api.add_pod(api.pod_on_node("default", "web", "web"));
    api.add_pod(api.pod_on_node("jobs", "batch", "batch"));
    let mut daemon = api.pod_on_node("kube-system", "node-exporter", "exporter");
    daemon["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "node-exporter", "uid": "u1"}]);
    api.add_pod(daemon);
    let mut mirror = api.pod_on_node("kube-system", "kube-proxy", "proxy");
    mirror["metadata"]["annotations"] = json!({"kubernetes.io/config.mirror": "abc"});
    api.add_pod(mirror);
    let mut trainer = api.pod_on_node("ml", "trainer", "trainer");
    trainer["spec"]["initContainers"] =
        json!([{"name": "nerve-sidecar", "image": "nerve", "restartPolicy": "Always"}]);
    api.add_pod(trainer);
    let mut elsewhere = api.pod_on_node("default", "elsewhere", "web");
    elsewhere["spec"]["nodeName"] = json!("another-node");
    api.add_pod(elsewhere);
    api.refuse_eviction("web", 1, WEB_RETRY_AFTER.as_secs());
    // A budget that says "not for an hour": the agent asks again at its cap instead.
    api.add_pod(api.pod_on_node("default", "cache", "cache"));
    api.refuse_eviction("cache", 1, 3600);

    let agent = start_agent(&sim, Some(&api), &["--drain"]);
    agent.wait_ready().await;
    sim.set_spot_interruption("terminate", in_two_minutes());
    assert!(
        api.wait_until(WAIT, |api| api.evicted().len() == 3).await,
        "log:\n{}",
        agent.log()
    );
    let mut evicted = api.evicted();
    evicted.sort();
    assert_eq!(evicted, vec!["default/cache", "default/web", "jobs/batch"]);
    let gap = |pod: &str| {
        let attempts: Vec<_> = api
            .requests()
            .into_iter()
            .filter(|r| r.path.contains(&format!("/pods/{pod}/eviction")))
            .map(|r| r.at)
            .collect();
        assert_eq!(attempts.len(), 2, "the 429 for {pod} is retried once");
        attempts[1] - attempts[0]
    };
    let web = gap("web");
    assert!(
        (WEB_RETRY_AFTER..MAX_RETRY_AFTER).contains(&web),
        "web is retried after its Retry-After of {WEB_RETRY_AFTER:?}, not after {web:?}"
    );
    let cache = gap("cache");
    assert!(
        (MAX_RETRY_AFTER..MAX_RETRY_AFTER + RETRY_SLACK).contains(&cache),
        "cache is retried at the {MAX_RETRY_AFTER:?} cap, not after {cache:?}"
    );
    let eviction = api
        .requests()
        .into_iter()
        .find(|r| r.path.contains("/pods/batch/eviction"))
        .unwrap();
    assert_eq!(eviction.method, "POST");
    assert_eq!(
        eviction.json(),
        json!({"apiVersion": "policy/v1", "kind": "Eviction",
               "metadata": {"name": "batch", "namespace": "jobs"}})
    );
    assert_eq!(eviction.content_type.as_deref(), Some("application/json"));
}

/// The metadata client on its own, as the sidecar uses it when the agent is unreachable.
#[tokio::test]
async fn the_metadata_client_keeps_notices_stable_and_through_faults() {
    use nerve_notice::{Cloud, MetadataClient};
    let sim = MetadataSimulator::start();
    let mut client =
        MetadataClient::new(&sim.url(), Cloud::Gcp, Duration::from_millis(500)).unwrap();
    let report = client.poll().await;
    assert_eq!(report.outcome(), "ok");
    assert!(report.answered && report.notices.is_empty());

    sim.set_gcp_preempted(true);
    let first = client.poll().await.notices;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].kind, NoticeKind::Preemption);
    assert_eq!(
        first[0].deadline - first[0].detected_at,
        time::Duration::seconds(30)
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        client.poll().await.notices,
        first,
        "same id and detection time on every poll"
    );

    sim.set_fault(Fault::ServerError);
    let report = client.poll().await;
    assert_eq!(report.outcome(), "http_5xx");
    assert!(!report.answered);
    assert_eq!(report.notices, first, "a failing poll keeps what was known");
    sim.set_fault(Fault::Hang);
    assert_eq!(client.poll().await.outcome(), "timeout");

    sim.set_fault(Fault::None);
    sim.set_gcp_preempted(false);
    let report = client.poll().await;
    assert_eq!(report.outcome(), "ok");
    assert!(report.notices.is_empty());
}

/// Time from the notice to its deadline in the blocked-drain test: the agent cordons, lists the
/// pods and makes two evictions one Retry-After apart (about 1.2 s on an idle machine); 6 s
/// leaves room for a loaded 2-core machine.
const DRAIN_WINDOW: Duration = Duration::from_secs(6);
/// How often the blocked eviction is retried there (its Retry-After).
const EVICTION_INTERVAL: Duration = Duration::from_secs(1);

#[tokio::test]
async fn a_drain_blocked_by_a_disruption_budget_stops_at_the_notice_deadline() {
    let sim = MetadataSimulator::start();
    let api = start_api();
    api.add_pod(api.pod_on_node("default", "guarded", "web"));
    api.refuse_eviction("guarded", usize::MAX, EVICTION_INTERVAL.as_secs());
    let agent = start_agent(&sim, Some(&api), &["--drain"]);
    agent.wait_ready().await;
    // Rounded up to the whole second the metadata service speaks in, never down.
    let at_least = OffsetDateTime::now_utc() + DRAIN_WINDOW;
    let deadline = (at_least + Duration::from_secs(1))
        .replace_nanosecond(0)
        .unwrap();
    sim.set_spot_interruption("terminate", deadline);
    let attempts = |api: &ApiServer| {
        api.requests()
            .iter()
            .filter(|r| r.path.contains("/pods/guarded/eviction"))
            .count()
    };
    assert!(
        api.wait_until(WAIT, |api| attempts(api) >= 2).await,
        "log:\n{}",
        agent.log()
    );
    assert!(
        OffsetDateTime::now_utc() < deadline,
        "two eviction attempts took the whole {DRAIN_WINDOW:?} window; log:\n{}",
        agent.log()
    );
    // Once the deadline has passed (and any attempt then in flight has been answered), the
    // attempts have stopped.
    let past = deadline + EVICTION_INTERVAL;
    tokio::time::sleep(Duration::try_from(past - OffsetDateTime::now_utc()).unwrap_or_default())
        .await;
    let stopped = attempts(&api);
    tokio::time::sleep(EVICTION_INTERVAL * 2).await;
    assert_eq!(attempts(&api), stopped, "no eviction after the deadline");
    assert!(api.evicted().is_empty());
    assert!(agent.log().contains("drain stopped at the notice deadline"));
}

/// Opens a watch stream from `source` (a loopback address) and reads only the status line and
/// headers: the status, and the connection, left unread from then on.
async fn watch_from(
    agent: &AgentProcess,
    source: std::net::Ipv4Addr,
) -> (u16, tokio::io::BufReader<TcpStream>) {
    use tokio::io::AsyncBufReadExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::from((source, 0)))
        .unwrap();
    let mut tcp = socket.connect(agent.addr()).await.unwrap();
    tcp.write_all(b"GET /v1/notices?watch=true HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut reader = tokio::io::BufReader::new(tcp);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).await.unwrap();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {status_line:?}"));
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    (status, reader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_holding_watch_streams_unread_leaves_room_for_the_sidecars() {
    use tokio::io::AsyncBufReadExt;
    let sim = MetadataSimulator::start();
    let agent = start_agent(&sim, None, &[]);
    agent.wait_ready().await;

    // One address opens streams and never reads them, until the agent refuses or it holds
    // every slot the agent has (1024).
    let hog = std::net::Ipv4Addr::new(127, 0, 0, 1);
    let mut held = Vec::new();
    let refused_after = loop {
        let (status, reader) = watch_from(&agent, hog).await;
        if status != 200 {
            assert_eq!(status, 503);
            break held.len();
        }
        held.push(reader);
        assert!(
            held.len() <= 1024,
            "one address was given every watch slot the agent has"
        );
    };

    // The sidecars, each from its own pod address, still subscribe and hear the notice.
    let mut sidecars = Vec::new();
    for host in 2..12 {
        let (status, mut reader) =
            watch_from(&agent, std::net::Ipv4Addr::new(127, 0, 0, host)).await;
        assert_eq!(status, 200, "sidecar at 127.0.0.{host} refused");
        let mut snapshot = String::new();
        reader.read_line(&mut snapshot).await.unwrap();
        assert!(snapshot.contains("snapshot"), "{snapshot}");
        sidecars.push(reader);
    }
    let deadline = in_two_minutes();
    sim.set_spot_interruption("terminate", deadline);
    for reader in &mut sidecars {
        let heard = tokio::time::timeout(WAIT, async {
            loop {
                let mut line = String::new();
                assert!(
                    reader.read_line(&mut line).await.unwrap() > 0,
                    "stream closed"
                );
                if line.contains(&spot_id(deadline)) {
                    return;
                }
            }
        })
        .await;
        assert!(heard.is_ok(), "a sidecar never heard the notice");
    }
    assert_eq!(refused_after, 512, "one address gets half the streams");

    // Idle connections from the same address are capped too: 32 beyond its streams, then the
    // agent answers 503 and closes instead of serving another.
    let mut idle = Vec::new();
    for _ in 0..32 {
        idle.push(TcpStream::connect(agent.addr()).await.unwrap());
    }
    let mut refused = TcpStream::connect(agent.addr()).await.unwrap();
    let mut answer = String::new();
    let read = tokio::time::timeout(WAIT, async {
        use tokio::io::AsyncReadExt;
        refused.read_to_string(&mut answer).await
    })
    .await;
    assert!(matches!(read, Ok(Ok(_))), "no answer: {read:?}");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    drop(idle);
    drop(held);
    assert!(
        wait_for(WAIT, || async {
            matches!(agent.get("/healthz").await, Some((200, _)))
        })
        .await,
        "the address gets its slots back once its connections close"
    );
}

#[tokio::test]
async fn an_azure_preemption_is_a_notice_even_when_the_vm_name_cannot_be_read() {
    let sim = MetadataSimulator::start();
    sim.set_azure_name_fails(true);
    let azure = start_agent(&sim, None, &["--cloud", "azure"]);
    azure.wait_ready().await;
    sim.set_azure_preempt(Some(in_two_minutes()));
    assert!(
        wait_for(WAIT, || async { azure.active_notices().await.len() == 1 }).await,
        "no notice while the name lookup fails; log:\n{}",
        azure.log()
    );
    let notice = &azure.active_notices().await[0];
    assert_eq!(notice["kind"], "preemption");
    assert_eq!(notice["source"], "azure");
    assert!(sim.azure_name_requests() >= 1, "the name was asked for");
    assert_eq!(
        azure.log().matches("cannot read this VM's name").count(),
        1,
        "the failure is logged once, not every poll"
    );

    // Once the name answers, an event for another VM of the scale set is not ours again.
    sim.set_azure_name_fails(false);
    sim.set_azure_preempt_for_other_vm(true);
    assert!(
        wait_for(WAIT, || async { azure.active_notices().await.is_empty() }).await,
        "an event naming another VM still counts once the name is known"
    );
    assert!(azure.log().contains("ignored again"), "{}", azure.log());
}
