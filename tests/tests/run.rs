//! `nerve-sidecar run` end to end, with real processes and real sockets: the real agent against
//! the metadata simulator, the in-process S3 server, and the `nerve-trainer` test trainer.
//!
//! Every test gives the sidecar a `--target` that matches only its own trainer (the checkpoint
//! directory is unique per test), because tests share one process namespace, unlike a pod.

use std::path::Path;
use std::time::Duration;

use nerve_tests::pod::{
    CHECKPOINT_TIMEOUT, EXIT_TIMEOUT, Rig, STARTUP_TIMEOUT, closed_port_url, http_get, in_seconds,
};
use time::OffsetDateTime;

#[test]
fn a_notice_on_the_agent_stream_commits_one_generation_the_trainer_resumes_from_exactly() {
    let rig = Rig::new("agent-stream");
    let (agent, agent_url) = rig.agent();
    let trainer = rig.trainer(
        &rig.dir,
        &["--done-marker", "DONE", "--exit-after-checkpoint"],
    );
    trainer.event("started", STARTUP_TIMEOUT);
    let mut sidecar = rig.sidecar(&agent_url, &["--done-marker", "DONE"]);
    sidecar.log("following the agent's notice stream", STARTUP_TIMEOUT);

    rig.imds.set_spot_interruption("terminate", in_seconds(120));
    let saved = trainer.event("checkpoint", CHECKPOINT_TIMEOUT);
    assert_eq!(saved["reason"], "signal");
    let manifests = rig.wait_manifests(1, CHECKPOINT_TIMEOUT, &sidecar);
    let committed = sidecar.log("checkpoint committed", CHECKPOINT_TIMEOUT);
    assert_eq!(committed["fields"]["completion"], "marker");
    assert_eq!(manifests[0]["notice"]["kind"], "spot-interruption");
    assert_eq!(manifests[0]["step"], saved["step"]);
    let heard = sidecar.log("notice", Duration::from_secs(1));
    assert_eq!(heard["fields"]["channel"], "agent");

    // The agent goes away: the fallback hears the same notice again, and takes no second
    // checkpoint.
    drop(agent);
    sidecar.wait_json("the switch to the fallback", STARTUP_TIMEOUT, |v| {
        v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("agent stream unavailable"))
    });
    let again = sidecar.log("notice heard again; already acted on", CHECKPOINT_TIMEOUT);
    assert_eq!(again["fields"]["channel"], "metadata");
    assert_eq!(rig.manifests().len(), 1);

    // The figures are on /metrics; health and readiness answer.
    let running = sidecar.has_log("sidecar running").expect("startup line");
    let address = running["fields"]["address"].as_str().expect("address");
    assert_eq!(http_get(address, "/healthz").0, 200);
    assert_eq!(http_get(address, "/readyz").0, 200);
    let (status, metrics) = http_get(address, "/metrics");
    assert_eq!(status, 200);
    for name in [
        "nerve_sidecar_time_to_safe_seconds",
        "nerve_sidecar_notice_to_signal_seconds",
        "nerve_sidecar_checkpoint_wait_seconds",
        "nerve_sidecar_deadline_margin_seconds",
        "nerve_sidecar_upload_duration_seconds",
    ] {
        assert!(
            metrics.contains(name),
            "{name} missing from /metrics:\n{metrics}"
        );
    }
    assert!(metrics.contains(r#"nerve_sidecar_checkpoints_total{outcome="committed"} 1"#));

    // SIGTERM after the notice's checkpoint: no second checkpoint, a prompt clean exit.
    sidecar.send(nix::sys::signal::Signal::SIGTERM);
    let status = sidecar.wait_exit(EXIT_TIMEOUT);
    assert!(status.success(), "exit status {status}");
    assert_eq!(rig.manifests().len(), 1);

    let resumed = rig.restore_and_verify();
    assert_eq!(resumed["step"], saved["step"]);
    assert_eq!(resumed["digest"], saved["digest"]);
}

#[test]
fn the_metadata_fallback_hears_the_notice_when_the_agent_is_down_and_quiet_completes_it() {
    let rig = Rig::new("fallback");
    let mut trainer = rig.trainer(&rig.dir, &["--write-pause", "50ms"]);
    trainer.event("started", STARTUP_TIMEOUT);
    let mut sidecar = rig.sidecar(&closed_port_url(), &[]);

    rig.imds.set_spot_interruption("terminate", in_seconds(120));
    let saved = trainer.event("checkpoint", CHECKPOINT_TIMEOUT);
    let manifests = rig.wait_manifests(1, CHECKPOINT_TIMEOUT, &sidecar);
    let committed = sidecar.log("checkpoint committed", CHECKPOINT_TIMEOUT);
    assert_eq!(committed["fields"]["completion"], "quiet");
    assert_eq!(manifests[0]["step"], saved["step"]);
    let heard = sidecar.log("notice", Duration::from_secs(1));
    assert_eq!(heard["fields"]["channel"], "metadata");
    assert!(
        trainer.is_alive(),
        "the trainer keeps running after its checkpoint"
    );

    sidecar.send(nix::sys::signal::Signal::SIGTERM);
    assert!(sidecar.wait_exit(EXIT_TIMEOUT).success());
    assert_eq!(rig.manifests().len(), 1);
    let resumed = rig.restore_and_verify();
    assert_eq!(resumed["digest"], saved["digest"]);
}

#[test]
fn sigterm_counts_as_a_notice_and_the_sidecar_exits_zero_after_committing() {
    let rig = Rig::new("sigterm");
    let trainer = rig.trainer(&rig.dir, &["--done-marker", "DONE"]);
    trainer.event("started", STARTUP_TIMEOUT);
    let mut sidecar = rig.sidecar(&closed_port_url(), &["--done-marker", "DONE"]);

    sidecar.send(nix::sys::signal::Signal::SIGTERM);
    let saved = trainer.event("checkpoint", CHECKPOINT_TIMEOUT);
    let status = sidecar.wait_exit(CHECKPOINT_TIMEOUT);
    assert!(
        status.success(),
        "exit status {status}:\n{}",
        sidecar.output()
    );
    let manifests = rig.manifests();
    assert_eq!(manifests.len(), 1);
    assert_eq!(manifests[0]["notice"]["kind"], "sigterm");
    assert_eq!(manifests[0]["step"], saved["step"]);
}

#[test]
fn a_process_without_a_handler_is_not_signalled_and_the_directory_is_still_uploaded() {
    let rig = Rig::new("no-handler");
    let mut trainer = rig.trainer(&rig.dir, &["--no-handler", "--checkpoint-at-start"]);
    let saved = trainer.event("checkpoint", STARTUP_TIMEOUT);
    let sidecar = rig.sidecar(&closed_port_url(), &[]);

    rig.imds.set_spot_interruption("terminate", in_seconds(120));
    let manifests = rig.wait_manifests(1, CHECKPOINT_TIMEOUT, &sidecar);
    assert_eq!(manifests[0]["step"], saved["step"]);
    assert!(
        sidecar.output().contains("no process matching --target"),
        "the sidecar says loudly that nobody handles the signal:\n{}",
        sidecar.output()
    );
    // SIGUSR1's default action would have killed it.
    assert!(
        trainer.is_alive(),
        "a process without a handler is never signalled"
    );
    assert!(trainer.json_lines().iter().all(|e| e["event"] != "signal"));
}

#[test]
fn a_trainer_that_never_finishes_is_cut_off_and_the_previous_generation_stays_the_one_restored() {
    let rig = Rig::new("cut-off");
    let trainer = rig.trainer(&rig.dir, &["--checkpoint-at-start", "--hang-on-checkpoint"]);
    let first = trainer.event("checkpoint", STARTUP_TIMEOUT);
    // The background sync commits the periodic checkpoint taken at start.
    let sidecar = rig.sidecar(
        &closed_port_url(),
        &["--background-sync", "true", "--sync-interval", "300ms"],
    );
    let manifests = rig.wait_manifests(1, CHECKPOINT_TIMEOUT, &sidecar);
    assert_eq!(manifests[0]["step"], first["step"]);

    // The trainer starts its checkpoint, keeps a file open for writing and never finishes.
    rig.imds.set_spot_interruption("terminate", in_seconds(12));
    trainer.event("signal", CHECKPOINT_TIMEOUT);
    sidecar.wait_json("the cut-off", CHECKPOINT_TIMEOUT, |v| {
        v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("was not complete"))
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(rig.manifests().len(), 1, "no torn checkpoint is committed");
    assert!(sidecar.has_log("checkpoint committed").is_none());

    let resumed = rig.restore_and_verify();
    assert_eq!(resumed["step"], first["step"]);
    assert_eq!(resumed["digest"], first["digest"]);
}

#[test]
fn with_background_sync_the_notice_uploads_only_the_new_files_bytes() {
    let rig = Rig::new("sync");
    let (_agent, agent_url) = rig.agent();
    // Four frozen model shards (3 MiB together) and the config are the same in every
    // checkpoint; the optimizer state (3 MiB) and the other small files change every step.
    let trainer = rig.trainer(
        &rig.dir,
        &[
            "--frozen-shards",
            "4",
            "--checkpoint-at-start",
            "--done-marker",
            "DONE",
        ],
    );
    let first = trainer.event("checkpoint", STARTUP_TIMEOUT);
    let sidecar = rig.sidecar(&agent_url, &nerve_tests::pod::MARKED_AND_SYNCING);
    let synced = rig.wait_manifests(1, CHECKPOINT_TIMEOUT, &sidecar);
    assert_eq!(synced[0]["step"], first["step"]);
    assert!(synced[0]["notice"].is_null());
    sidecar.log("following the agent's notice stream", STARTUP_TIMEOUT);

    rig.imds.set_spot_interruption("terminate", in_seconds(120));
    let saved = trainer.wait_json("the signal's checkpoint", CHECKPOINT_TIMEOUT, |v| {
        v["event"] == "checkpoint" && v["reason"] == "signal"
    });
    let manifests = rig.wait_manifests(2, CHECKPOINT_TIMEOUT, &sidecar);
    let notice_manifest = &manifests[1];
    assert_eq!(notice_manifest["step"], saved["step"]);

    // Which files' bytes went up with the notice's generation, which were reused.
    let generation = notice_manifest["generation"].as_str().expect("generation");
    let files = notice_manifest["files"].as_array().expect("files");
    let (mut uploaded, mut reused) = (0u64, 0u64);
    for file in files {
        let size = file["size"].as_u64().expect("size");
        let path = file["path"].as_str().expect("path");
        let key = file["key"].as_str().expect("key");
        // The model config is the same in every checkpoint too.
        let frozen = path.contains("/model-") || path.ends_with("/config.json");
        if key.contains(&format!("/gen/{generation}/")) {
            assert!(!frozen, "{path} did not change, yet was uploaded again");
            uploaded += size;
        } else {
            assert!(frozen, "{path} changed, yet was not uploaded");
            reused += size;
        }
    }
    let new_checkpoint = Path::new(saved["path"].as_str().expect("path"));
    // The done marker is not checkpoint content: never uploaded.
    assert!(files.iter().all(|f| f["path"] != "DONE"));
    let expected_new: u64 = walk_sizes(new_checkpoint)
        .into_iter()
        .filter(|(name, _)| !name.starts_with("model-") && name != "config.json")
        .map(|(_, size)| size)
        .sum::<u64>();
    let config = std::fs::metadata(new_checkpoint.join("config.json")).expect("config");
    assert_eq!(
        reused,
        (3 << 20) + config.len(),
        "the frozen shards are reused"
    );
    assert_eq!(uploaded, expected_new, "only the new files' bytes are sent");
    let committed = sidecar.log("checkpoint committed", CHECKPOINT_TIMEOUT);
    assert_eq!(committed["fields"]["bytes_uploaded"], uploaded);
    assert_eq!(committed["fields"]["bytes_reused"], reused);
}

fn walk_sizes(dir: &Path) -> Vec<(String, u64)> {
    std::fs::read_dir(dir)
        .expect("read checkpoint")
        .filter_map(|e| e.ok())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().expect("metadata").len(),
            )
        })
        .collect()
}

#[test]
fn a_sidecar_started_after_the_notice_acts_on_the_agents_snapshot() {
    let rig = Rig::new("snapshot");
    let (agent, agent_url) = rig.agent();
    rig.imds.set_spot_interruption("terminate", in_seconds(120));
    agent.log("notice", STARTUP_TIMEOUT);
    let trainer = rig.trainer(&rig.dir, &["--done-marker", "DONE"]);
    trainer.event("started", STARTUP_TIMEOUT);

    let sidecar = rig.sidecar(&agent_url, &["--done-marker", "DONE"]);
    let saved = trainer.event("checkpoint", CHECKPOINT_TIMEOUT);
    let manifests = rig.wait_manifests(1, CHECKPOINT_TIMEOUT, &sidecar);
    assert_eq!(manifests[0]["step"], saved["step"]);
    let heard = sidecar.log("notice", Duration::from_secs(5));
    assert_eq!(heard["fields"]["channel"], "agent");
}

#[test]
fn a_rebalance_recommendation_syncs_the_directory_now_without_signalling_the_trainer() {
    let rig = Rig::new("prepare");
    let trainer = rig.trainer(&rig.dir, &["--checkpoint-at-start"]);
    let saved = trainer.event("checkpoint", STARTUP_TIMEOUT);
    // The interval alone would not sync within the test.
    let sidecar = rig.sidecar(
        &closed_port_url(),
        &["--background-sync", "true", "--sync-interval", "1h"],
    );
    sidecar.log(
        "agent stream unavailable; polling the metadata service until it is back",
        STARTUP_TIMEOUT,
    );
    assert!(rig.manifests().is_empty());

    rig.imds
        .set_rebalance_recommendation(OffsetDateTime::now_utc() + time::Duration::minutes(5));
    let manifests = rig.wait_manifests(1, CHECKPOINT_TIMEOUT, &sidecar);
    assert_eq!(manifests[0]["step"], saved["step"]);
    assert!(
        manifests[0]["notice"].is_null(),
        "a sync, not a notice checkpoint"
    );
    assert!(trainer.json_lines().iter().all(|e| e["event"] != "signal"));
}

/// A save that begins right after the notice's: its first file is on disk before the sidecar
/// lists the directory, and the rest comes later.
const SAVE_THEN_BEGIN_ANOTHER: &str = r#"
D="$2"
save() {
  mkdir -p "$D/checkpoint-5" "$D/checkpoint-6"
  printf 'weights of step 5' > "$D/checkpoint-5/model.safetensors"
  printf '{"global_step": 5}' > "$D/checkpoint-5/trainer_state.json"
  printf 'step=5\nreason=notice\n' > "$D/DONE.tmp" && mv "$D/DONE.tmp" "$D/DONE"
  printf 'the first half of step 6' > "$D/checkpoint-6/model.safetensors"
  echo '{"event":"saved"}'
}
trap save USR1
echo '{"event":"started"}'
while :; do sleep 0.1; done
"#;

#[test]
fn a_newer_checkpoint_begun_after_the_done_marker_is_not_committed_with_the_marked_one() {
    let rig = Rig::new("newer-half-checkpoint");
    let trainer = nerve_tests::pod::Proc::spawn(
        "trainer",
        std::process::Command::new("sh")
            .args(["-c", SAVE_THEN_BEGIN_ANOTHER, "nerve-trainer", "--dir"])
            .arg(&rig.dir),
    );
    trainer.event("started", STARTUP_TIMEOUT);
    let sidecar = rig.sidecar(&closed_port_url(), &["--done-marker", "DONE"]);
    sidecar.log("sidecar running", STARTUP_TIMEOUT);

    rig.imds.set_spot_interruption("terminate", in_seconds(120));
    trainer.event("saved", CHECKPOINT_TIMEOUT);
    let manifests = rig.wait_manifests(1, CHECKPOINT_TIMEOUT, &sidecar);
    assert_eq!(manifests[0]["step"], 5);
    let paths = nerve_tests::pod::manifest_paths(&manifests[0]);
    assert!(
        paths.iter().all(|p| !p.starts_with("checkpoint-6/")),
        "the generation of step 5 holds a piece of checkpoint-6, which restore then puts \
         back as the newest checkpoint: {paths:?}"
    );
}
