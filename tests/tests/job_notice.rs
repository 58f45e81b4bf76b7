//! One node's notice reaches every pod of the job: three pods on three simulated nodes (a
//! metadata simulator and a real agent each), one S3 server. The sidecar whose node gets the
//! notice publishes it in the store; the others poll it, signal their trainers and commit their
//! parts, and the trainers agree on the step to save.

use std::time::{Duration, Instant};

use nerve_tests::fault_proxy::{Fault, FaultProxy, Rule};
use nerve_tests::pod::{
    CHECKPOINT_TIMEOUT, Job, Nodes, Proc, STARTUP_TIMEOUT, http_get, in_seconds, wait_for,
};
use serde_json::Value;

/// How often the tests' sidecars poll the job-wide notice.
const PEER_POLL: Duration = Duration::from_secs(1);
/// The latency budget of a peer's notice: one poll, plus the 500 ms, plus slack for the
/// 2-core test machine running three trainers, three sidecars and three agents. The bench
/// measures the real figure (bench/job).
const PEER_SIGNAL_BOUND: Duration = Duration::from_secs(4);

fn peer_args(extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--peer-poll".to_owned(),
        format!("{}ms", PEER_POLL.as_millis()),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

fn sidecars(job: &Job, nodes: &Nodes, extra: &[&str]) -> Vec<Proc> {
    let args = peer_args(extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (0..job.world)
        .map(|rank| {
            let sidecar = job.sidecar_on(rank, &nodes.nodes[rank as usize], &args, &[]);
            sidecar.log("following the agent's notice stream", STARTUP_TIMEOUT);
            sidecar
        })
        .collect()
}

/// The first checkpoint a trainer took for a notice (its own signal, or a peer's through the
/// agreement).
fn notice_checkpoint(trainer: &Proc) -> Value {
    trainer.wait_json("the notice's checkpoint", CHECKPOINT_TIMEOUT, |v| {
        v["event"] == "checkpoint" && (v["reason"] == "signal" || v["reason"] == "peer")
    })
}

fn metric(sidecar: &Proc, name: &str) -> f64 {
    let running = sidecar.has_log("sidecar running").expect("startup line");
    let address = running["fields"]["address"].as_str().expect("address");
    let (_, body) = http_get(address, "/metrics");
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_notice_on_one_node_signals_every_trainer_and_every_part_commits_at_one_step() {
    let job = Job::new("job-notice", 3);
    let nodes = Nodes::start(3);
    let trainers: Vec<Proc> = (0..3)
        .map(|rank| job.trainer(rank, &["--done-marker", "DONE"]))
        .collect();
    for trainer in &trainers {
        trainer.event("started", STARTUP_TIMEOUT);
    }
    let sidecars = sidecars(&job, &nodes, &["--done-marker", "DONE"]);

    let noticed = Instant::now();
    nodes.simulators[2].set_spot_interruption("terminate", in_seconds(120));
    let mut signalled = Vec::new();
    for (rank, trainer) in trainers.iter().enumerate() {
        trainer.event("signal", CHECKPOINT_TIMEOUT);
        signalled.push((rank, noticed.elapsed()));
    }
    for (rank, latency) in &signalled {
        assert!(
            *latency <= PEER_SIGNAL_BOUND,
            "rank {rank}'s trainer was signalled {latency:?} after the notice on node 2"
        );
    }
    let saved: Vec<Value> = trainers.iter().map(notice_checkpoint).collect();
    let step = saved[0]["step"].as_u64().expect("step");
    assert!(saved.iter().all(|s| s["step"] == step), "{saved:?}");
    for sidecar in &sidecars {
        sidecar.log("checkpoint committed", CHECKPOINT_TIMEOUT);
    }
    let manifest = wait_for("the job manifest", CHECKPOINT_TIMEOUT, || {
        job.job_manifest(step)
    })
    .unwrap_or_else(|| panic!("no job manifest; parts {:?}", job.parts(step)));
    assert_eq!(manifest["world_size"], 3);
    let heard = sidecars[0].log("notice from another pod of the job", CHECKPOINT_TIMEOUT);
    assert!(
        ["peer", "marker"].contains(&heard["fields"]["channel"].as_str().unwrap_or_default()),
        "{heard}"
    );
    assert!(metric(&sidecars[2], "nerve_sidecar_parts_total") >= 1.0);
    eprintln!("notice on node 2 -> signalled: {signalled:?}");
}

#[test]
fn a_store_unreachable_for_ten_seconds_delays_the_peer_notice_but_it_is_still_taken() {
    let job = Job::new("notice-outage", 2);
    let nodes = Nodes::start(2);
    // Trainers that do not agree with each other: only the store can bring rank 0 the notice.
    let trainers: Vec<Proc> = (0..2)
        .map(|rank| job.rig.trainer(&job.dir(rank), &["--done-marker", "DONE"]))
        .collect();
    for trainer in &trainers {
        trainer.event("started", STARTUP_TIMEOUT);
    }
    let proxy = FaultProxy::start(job.rig.s3.addr()).expect("proxy");
    proxy.add_rule(
        Rule::new(Fault::InternalError)
            .method("GET")
            .path_contains("notice.json"),
    );
    let endpoint = proxy.endpoint();
    let args = peer_args(&["--done-marker", "DONE"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let rank0 = job.sidecar_on(
        0,
        &nodes.nodes[0],
        &args,
        &[("AWS_ENDPOINT_URL", endpoint.as_str())],
    );
    let rank1 = job.sidecar_on(1, &nodes.nodes[1], &args, &[]);
    rank0.log("following the agent's notice stream", STARTUP_TIMEOUT);
    rank1.log("following the agent's notice stream", STARTUP_TIMEOUT);

    let outage = Instant::now();
    nodes.simulators[1].set_spot_interruption("terminate", in_seconds(120));
    rank1.log("checkpoint committed", CHECKPOINT_TIMEOUT);
    std::thread::sleep(Duration::from_secs(10).saturating_sub(outage.elapsed()));
    assert!(
        trainers[0]
            .json_lines()
            .iter()
            .all(|e| e["event"] != "signal"),
        "rank 0 cannot have heard of the notice while the store fails"
    );
    assert!(metric(&rank0, "nerve_sidecar_peer_polls_total{outcome=\"error\"}") >= 3.0);
    proxy.clear_rules();
    let back = Instant::now();
    trainers[0].event("signal", CHECKPOINT_TIMEOUT);
    rank0.log("checkpoint committed", CHECKPOINT_TIMEOUT);
    eprintln!(
        "rank 0 signalled {:?} after the store came back",
        back.elapsed()
    );
}

#[test]
fn a_stale_notice_in_the_store_is_ignored() {
    let job = Job::new("stale-notice", 2);
    let nodes = Nodes::start(2);
    // A notice published long ago for a node that is gone.
    let stale = serde_json::json!({
        "id": "spot-interruption/2026-11-01T00:00:00Z", "kind": "spot-interruption", "rank": 1,
        "deadline": "2026-11-01T00:00:00Z", "detected_at": "2026-10-31T23:58:00Z"
    });
    let key = job
        .rig
        .s3
        .root()
        .join(nerve_tests::pod::BUCKET)
        .join(nerve_tests::pod::PREFIX)
        .join(&job.rig.job)
        .join("notice.json");
    std::fs::create_dir_all(key.parent().expect("parent")).expect("mkdir");
    std::fs::write(&key, serde_json::to_vec(&stale).expect("json")).expect("write");
    let trainers: Vec<Proc> = (0..2)
        .map(|rank| job.trainer(rank, &["--done-marker", "DONE"]))
        .collect();
    let sidecars = sidecars(&job, &nodes, &["--done-marker", "DONE"]);
    sidecars[0].log("ignoring a stale job-wide notice (its deadline passed, or a generation was committed since)", CHECKPOINT_TIMEOUT);
    std::thread::sleep(PEER_POLL * 3);
    for trainer in &trainers {
        assert!(trainer.json_lines().iter().all(|e| e["event"] != "signal"));
    }
    assert!(job.parts(0).is_empty());
}

#[test]
fn a_rank_whose_trainer_never_finishes_leaves_the_generation_incomplete_and_never_restored() {
    let job = Job::new("hung-rank", 3);
    let nodes = Nodes::start(3);
    let trainers: Vec<Proc> = (0..3)
        .map(|rank| {
            let mut extra = vec!["--done-marker", "DONE", "--checkpoint-at-start"];
            if rank == 1 {
                extra.push("--hang-on-checkpoint");
            }
            job.trainer(rank, &extra)
        })
        .collect();
    let first: Vec<Value> = trainers
        .iter()
        .map(|t| {
            t.wait_json("the first checkpoint", STARTUP_TIMEOUT, |v| {
                v["event"] == "checkpoint" && v["reason"] == "periodic"
            })
        })
        .collect();
    let first_step = first[0]["step"].as_u64().expect("step");
    let sidecars = sidecars(&job, &nodes, &nerve_tests::pod::MARKED_AND_SYNCING);
    wait_for("the first generation", CHECKPOINT_TIMEOUT, || {
        job.job_manifest(first_step)
    })
    .expect("background sync commits every rank's periodic checkpoint");

    nodes.simulators[0].set_spot_interruption("terminate", in_seconds(120));
    for rank in [0, 2] {
        sidecars[rank].log("checkpoint committed", CHECKPOINT_TIMEOUT);
    }
    let saved = notice_checkpoint(&trainers[0]);
    let step = saved["step"].as_u64().expect("step");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        job.parts(step),
        [0, 2],
        "rank 1's trainer never finished its save"
    );
    assert!(job.job_manifest(step).is_none());
    for rank in 0..3 {
        let (_, resumed) = job.restore_and_verify(rank, &[]);
        assert_eq!(
            resumed["step"], first_step,
            "the incomplete generation is never restored"
        );
    }
}
