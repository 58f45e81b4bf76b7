//! Multi-pod jobs end to end: several pods (a sidecar and a test trainer each, with ranks) and
//! one S3 server. The trainers agree on the step to save through a file-based MAX all-reduce
//! (what torch.distributed gives real trainers); each sidecar commits its rank's part and the
//! last one commits the generation.

use std::path::Path;
use std::time::Duration;

use nerve_tests::fault_proxy::{Fault, FaultProxy, Rule};
use nerve_tests::pod::{CHECKPOINT_TIMEOUT, EXIT_TIMEOUT, Job, Proc, STARTUP_TIMEOUT, in_seconds};
use serde_json::Value;

/// The checkpoint a trainer took for `reason`: `periodic`, or `notice` (asked by its own
/// signal, or by a peer's through the all-reduce).
/// Sets a Spot notice on the job's node and returns every trainer's notice checkpoint event
/// and the step of the first.
fn notice_saves(job: &Job, trainers: &[Proc]) -> (Vec<Value>, u64) {
    job.rig
        .imds
        .set_spot_interruption("terminate", in_seconds(120));
    let saved: Vec<Value> = trainers
        .iter()
        .map(|t| checkpoint_event(t, "notice"))
        .collect();
    let step = saved[0]["step"].as_u64().expect("step");
    (saved, step)
}

fn checkpoint_event(trainer: &Proc, reason: &str) -> Value {
    trainer.wait_json("the agreed checkpoint", CHECKPOINT_TIMEOUT, |v| {
        let taken = v["reason"].as_str().unwrap_or_default();
        let wanted = match reason {
            "notice" => taken == "signal" || taken == "peer",
            _ => taken == reason,
        };
        v["event"] == "checkpoint" && wanted
    })
}

#[test]
fn three_pods_checkpoint_the_same_step_and_the_last_part_commits_the_generation() {
    let job = Job::new("three-pods", 3);
    let trainers: Vec<Proc> = (0..3)
        .map(|rank| job.trainer(rank, &["--done-marker", "DONE"]))
        .collect();
    for trainer in &trainers {
        trainer.event("started", STARTUP_TIMEOUT);
    }
    let sidecars: Vec<Proc> = (0..3)
        .map(|rank| job.sidecar(rank, &["--done-marker", "DONE"], &[]))
        .collect();
    let (saved, step) = notice_saves(&job, &trainers);
    assert!(
        saved.iter().all(|s| s["step"] == saved[0]["step"]),
        "every rank saves the same step: {saved:?}"
    );
    for sidecar in &sidecars {
        sidecar.log("checkpoint committed", CHECKPOINT_TIMEOUT);
    }
    let manifest = nerve_tests::pod::wait_for("the job manifest", CHECKPOINT_TIMEOUT, || {
        job.job_manifest(step)
    })
    .unwrap_or_else(|| panic!("no job manifest; parts {:?}", job.parts(step)));
    assert_eq!(manifest["kind"], "job");
    assert_eq!(manifest["world_size"], 3);
    assert_eq!(manifest["step"], step);
    let ranks: Vec<u64> = manifest["parts"]
        .as_array()
        .expect("parts")
        .iter()
        .map(|p| p["rank"].as_u64().expect("rank"))
        .collect();
    assert_eq!(ranks, [0, 1, 2]);

    // Three fresh pods restore the same step; every trainer resumes with its own state.
    for (rank, saved) in saved.iter().enumerate() {
        let rank = u32::try_from(rank).expect("rank");
        let (_, resumed) = job.restore_and_verify(rank, &[]);
        assert_eq!(resumed["step"], step);
        assert_eq!(resumed["digest"], saved["digest"]);
    }
    // --parts own brings this rank's shards and the files every rank needs, nothing else.
    let (dir, resumed) = job.restore_and_verify(1, &["--parts", "own"]);
    assert_eq!(resumed["digest"], saved[1]["digest"]);
    let checkpoint = dir.join(format!("checkpoint-{step}"));
    assert!(checkpoint.join("rank-1").is_dir());
    assert!(!checkpoint.join("rank-0").exists() && !checkpoint.join("rank-2").exists());
    assert!(checkpoint.join("trainer_state.json").is_file());
}

#[test]
fn a_rank_killed_mid_upload_leaves_its_generation_incomplete_and_restore_takes_the_previous() {
    let job = Job::new("killed-rank", 3);
    let trainers: Vec<Proc> = (0..3)
        .map(|rank| job.trainer(rank, &["--done-marker", "DONE", "--checkpoint-at-start"]))
        .collect();
    let first: Vec<Value> = trainers
        .iter()
        .map(|t| checkpoint_event(t, "periodic"))
        .collect();
    // Rank 2 reaches the store through a proxy that holds its new files' PUTs, so it is still
    // uploading its part when it is killed.
    let proxy = FaultProxy::start(job.rig.s3.addr()).expect("proxy");
    let endpoint = proxy.endpoint();
    let sync = nerve_tests::pod::MARKED_AND_SYNCING;
    let mut sidecars: Vec<Proc> = (0..2).map(|rank| job.sidecar(rank, &sync, &[])).collect();
    sidecars.push(job.sidecar(2, &sync, &[("AWS_ENDPOINT_URL", endpoint.as_str())]));
    let first_step = first[0]["step"].as_u64().expect("step");
    nerve_tests::pod::wait_for("the first generation", CHECKPOINT_TIMEOUT, || {
        job.job_manifest(first_step)
    })
    .expect("background sync commits the periodic checkpoint of every rank");

    proxy.add_rule(
        Rule::new(Fault::Delay(Duration::from_secs(30)))
            .method("PUT")
            .path_contains("/rank-2/checkpoint-"),
    );
    let (_, step) = notice_saves(&job, &trainers);
    nerve_tests::pod::wait_for("rank 2 uploading", CHECKPOINT_TIMEOUT, || {
        (!proxy.injected().is_empty()).then_some(())
    })
    .expect("rank 2 starts its upload");
    sidecars[2].send(nix::sys::signal::Signal::SIGKILL);
    sidecars[2].wait_exit(EXIT_TIMEOUT);
    for sidecar in &sidecars[..2] {
        sidecar.log("checkpoint committed", CHECKPOINT_TIMEOUT);
    }
    assert_eq!(job.parts(step), [0, 1]);
    assert!(
        job.job_manifest(step).is_none(),
        "a generation some rank never committed"
    );

    let listing = job.store_command(0, "list", &["--json"]);
    let lines: Vec<Value> = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let incomplete = lines
        .iter()
        .find(|l| l["step"] == step)
        .expect("list shows the incomplete generation");
    assert_eq!(incomplete["committed"], false);
    assert_eq!(incomplete["parts_committed"], 2);
    assert_eq!(incomplete["world_size"], 3);

    for rank in 0..3 {
        let (_, resumed) = job.restore_and_verify(rank, &[]);
        assert_eq!(
            resumed["step"], first_step,
            "the newest complete generation"
        );
        assert_eq!(resumed["digest"], first[rank as usize]["digest"]);
    }
}

#[test]
fn a_signal_that_arrives_during_a_long_agreed_save_is_taken_as_already_answered() {
    let job = Job::new("late-signal", 2);
    // A save longer than the trainer's 10 s answered window: 6 MiB with a 2 s pause per MiB.
    let slow = ["--done-marker", "DONE", "--write-pause", "2s"];
    let trainers: Vec<Proc> = (0..2).map(|rank| job.trainer(rank, &slow)).collect();
    for trainer in &trainers {
        trainer.event("started", STARTUP_TIMEOUT);
    }
    trainers[1].send(nix::sys::signal::Signal::SIGUSR1);
    // Rank 0 saves for its peer through the agreement; its sidecar's signal for the same
    // notice comes while it writes (the store's poll, or its own done marker, comes later).
    std::thread::sleep(Duration::from_secs(1));
    trainers[0].send(nix::sys::signal::Signal::SIGUSR1);
    let saved = checkpoint_event(&trainers[0], "notice");
    assert_eq!(saved["reason"], "peer");
    let late = trainers[0].event("signal", CHECKPOINT_TIMEOUT);
    assert_eq!(late["already_answered"], true, "{late}");
    std::thread::sleep(Duration::from_secs(2));
    for trainer in &trainers {
        let saves = trainer
            .json_lines()
            .iter()
            .filter(|v| v["event"] == "checkpoint")
            .count();
        assert_eq!(
            saves,
            1,
            "no second save for one notice:\n{}",
            trainer.output()
        );
    }
}

/// Writes a one-file checkpoint for `step` into `dir` holding `config` as `config.json`.
fn write_small_checkpoint(dir: &Path, step: u64, config: &str, rank: u32) {
    let checkpoint = dir.join(format!("checkpoint-{step}"));
    std::fs::create_dir_all(checkpoint.join(format!("rank-{rank}"))).expect("mkdir");
    std::fs::write(
        checkpoint.join(format!("rank-{rank}/weights.bin")),
        rank.to_string(),
    )
    .expect("write");
    std::fs::write(checkpoint.join("config.json"), config).expect("write");
    std::fs::write(
        checkpoint.join("trainer_state.json"),
        format!("{{\"global_step\": {step}}}"),
    )
    .expect("write");
}

#[test]
fn two_ranks_claiming_different_contents_for_one_path_fail_restore_without_touching_the_directory()
{
    let job = Job::new("conflict", 2);
    for (rank, config) in [(0, "{\"lr\": 0.1}"), (1, "{\"lr\": 0.2}")] {
        let dir = job.dir(rank);
        write_small_checkpoint(&dir, 5, config, rank);
        let output = job.command(rank, "upload", &dir, &[]);
        assert!(output.status.success(), "{output:?}");
    }
    assert!(job.job_manifest(5).is_some());
    let target = job.rig.work.path().join("target");
    std::fs::create_dir_all(&target).expect("mkdir");
    std::fs::write(target.join("mine.txt"), b"untouched").expect("write");
    let output = job.command(0, "restore", &target, &[]);
    assert!(!output.status.success());
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        said.contains("ranks 0 and 1") && said.contains("config.json"),
        "{said}"
    );
    let names: Vec<String> = std::fs::read_dir(&target)
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["mine.txt"]);
    // The user chooses which rank wins.
    let output = job.command(0, "restore", &target, &["--prefer-rank", "1"]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        std::fs::read_to_string(target.join("checkpoint-5/config.json")).expect("read"),
        "{\"lr\": 0.2}"
    );
}

#[test]
fn a_ranks_part_of_a_marked_step_leaves_out_the_newer_checkpoint_it_began() {
    let job = Job::new("newer-in-part", 2);
    for rank in [0, 1] {
        write_small_checkpoint(&job.dir(rank), 5, "{}", rank);
    }
    // Rank 0's trainer marked step 5 and went on to begin step 6.
    let dir = job.dir(0);
    std::fs::write(dir.join(".nerve-done"), "step=5\nreason=notice\n").expect("write");
    std::fs::create_dir_all(dir.join("checkpoint-6/rank-0")).expect("mkdir");
    std::fs::write(dir.join("checkpoint-6/rank-0/weights.bin"), "half").expect("write");
    for rank in [0, 1] {
        let output = job.command(rank, "upload", &job.dir(rank), &[]);
        assert!(output.status.success(), "{output:?}");
    }
    assert_eq!(job.parts(5), [0, 1]);
    assert!(job.job_manifest(5).is_some());
    let part: Value = serde_json::from_slice(
        &std::fs::read(job.gen_dir().join("step-000000000005/rank-0.manifest.json"))
            .expect("rank 0's part"),
    )
    .expect("json");
    let paths = nerve_tests::pod::manifest_paths(&part);
    assert!(
        paths.iter().all(|p| !p.starts_with("checkpoint-6/")),
        "{paths:?}"
    );
}

#[test]
fn prune_keeps_complete_generations_and_drops_incomplete_ones_behind_them() {
    let job = Job::new("prune-parts", 2);
    let upload = |rank: u32, step: u64| {
        let dir = job.dir(rank);
        let _ = std::fs::remove_dir_all(&dir);
        write_small_checkpoint(&dir, step, "{}", rank);
        let output = job.command(rank, "upload", &dir, &[]);
        assert!(output.status.success(), "{output:?}");
    };
    // Step 5 complete, step 7 missing rank 1, step 9 complete, step 11 still being uploaded.
    for (step, ranks) in [(5, &[0, 1][..]), (7, &[0]), (9, &[0, 1]), (11, &[0])] {
        for rank in ranks {
            upload(*rank, step);
        }
    }
    let prune = |grace: &str| {
        let output = job.store_command(0, "prune", &["--keep", "1", "--incomplete-grace", grace]);
        assert!(output.status.success(), "{output:?}");
    };
    prune("1h");
    assert!(job.job_manifest(5).is_none(), "beyond --keep 1");
    assert_eq!(
        job.parts(7),
        [0],
        "incomplete, but younger than the grace period"
    );
    prune("0s");
    assert!(
        job.parts(7).is_empty(),
        "incomplete and behind the newest complete step"
    );
    assert!(job.job_manifest(9).is_some());
    assert_eq!(
        job.parts(11),
        [0],
        "above the newest complete step: in progress"
    );
    let restored = job.rig.work.path().join("restored");
    let output = job.command(1, "restore", &restored, &[]);
    assert!(output.status.success(), "{output:?}");
    assert!(restored.join("checkpoint-9/rank-1/weights.bin").is_file());
    assert!(restored.join("checkpoint-9/rank-0/weights.bin").is_file());
}

#[test]
fn a_rank_that_cannot_tell_its_step_refuses_to_commit_a_part_and_names_the_three_sources() {
    let job = Job::new("no-step", 2);
    let dir = job.dir(0);
    std::fs::write(dir.join("weights.bin"), b"no step anywhere").expect("write");
    let output = job.command(0, "upload", &dir, &[]);
    assert!(!output.status.success());
    let said = String::from_utf8_lossy(&output.stderr);
    for source in ["done marker", "checkpoint-N", "trainer_state.json"] {
        assert!(said.contains(source), "the message names {source}: {said}");
    }
    assert!(job.parts(0).is_empty());
}

#[test]
fn a_ranks_unchanged_files_are_reused_from_its_own_previous_part() {
    let job = Job::new("part-reuse", 2);
    let dir = job.dir(1);
    let frozen = vec![7u8; 256 * 1024];
    for step in [5u64, 9] {
        let checkpoint = dir.join(format!("checkpoint-{step}"));
        std::fs::create_dir_all(&checkpoint).expect("mkdir");
        std::fs::write(checkpoint.join("frozen.bin"), &frozen).expect("write");
        std::fs::write(
            checkpoint.join("trainer_state.json"),
            format!("{{\"global_step\": {step}}}"),
        )
        .expect("write");
        let output = job.command(1, "upload", &dir, &[]);
        assert!(output.status.success(), "{output:?}");
        std::fs::remove_dir_all(&checkpoint).expect("rm");
    }
    let part: Value = serde_json::from_slice(
        &std::fs::read(job.gen_dir().join("step-000000000009/rank-1.manifest.json"))
            .expect("part of step 9"),
    )
    .expect("json");
    let frozen_entry = part["files"]
        .as_array()
        .expect("files")
        .iter()
        .find(|f| f["path"] == "checkpoint-9/frozen.bin")
        .expect("frozen.bin");
    let key = frozen_entry["key"].as_str().expect("key");
    assert!(
        key.contains("/gen/step-000000000005/rank-1/"),
        "reused from the rank's part of step 5: {key}"
    );
}
