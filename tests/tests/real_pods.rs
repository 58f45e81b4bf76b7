//! Pods shaped like the ones people run, end to end with the real binaries: a logger holding a
//! file open beside the checkpoints, a volume that outlives its pod, links in the checkpoint
//! directory, a trainer killed mid-save, checkpoint rotation during the upload, a trainer that
//! exits before the sidecar's SIGTERM, a second container with signal handlers, and a
//! bind-mounted checkpoint directory.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nerve_tests::fault_proxy::{Fault, FaultProxy, Rule};
use nerve_tests::pod::{
    CHECKPOINT_TIMEOUT, EXIT_TIMEOUT, Rig, STARTUP_TIMEOUT, closed_port_url, in_seconds,
    manifest_paths,
};
use nerve_tests::trainer::{self, StateShape, WriteOptions};
use nix::sys::signal::Signal;

/// Where the Hugging Face Trainer's TensorBoard logger writes, under `output_dir`.
const TENSORBOARD_FILE: &str = "runs/Nov30_03-29-15_trainer-0/events.out.tfevents.1764473355.0";

/// Every object the store holds for the rig's job, as bytes.
fn stored_objects(rig: &Rig) -> Vec<Vec<u8>> {
    let mut found = Vec::new();
    let mut pending = vec![rig.s3.root().to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("ls").flatten() {
            if entry.file_type().expect("type").is_dir() {
                pending.push(entry.path());
            } else {
                found.push(std::fs::read(entry.path()).expect("read"));
            }
        }
    }
    found
}

fn shape() -> StateShape {
    StateShape {
        seed: 1,
        size: 6 << 20,
        shards: 4,
        frozen_shards: 0,
    }
}

#[test]
fn an_open_tensorboard_file_under_the_directory_does_not_block_the_notice_checkpoint() {
    let rig = Rig::new("tensorboard");
    let trainer = rig.trainer(
        &rig.dir,
        &["--checkpoint-at-start", "--log-open", TENSORBOARD_FILE],
    );
    trainer.event("checkpoint", STARTUP_TIMEOUT);
    // Background sync commits the periodic checkpoint although the logger never closes its file.
    let sidecar = rig.sidecar(
        &closed_port_url(),
        &["--background-sync", "true", "--sync-interval", "300ms"],
    );
    let synced = rig.wait_manifests(1, CHECKPOINT_TIMEOUT, &sidecar);
    assert!(synced[0]["notice"].is_null());

    rig.imds.set_spot_interruption("terminate", in_seconds(120));
    let saved = trainer.wait_json("the signal's checkpoint", CHECKPOINT_TIMEOUT, |v| {
        v["event"] == "checkpoint" && v["reason"] == "signal"
    });
    let committed = sidecar.log("checkpoint committed", CHECKPOINT_TIMEOUT);
    assert_eq!(committed["fields"]["completion"], "quiet");
    let margin = committed["fields"]["deadline_margin_seconds"]
        .as_f64()
        .expect("margin");
    assert!(
        margin > 60.0,
        "committed with {margin:.1}s of a 120s window left: the open log must not hold it up"
    );
    let manifests = rig.manifests();
    let notice = manifests.last().expect("the notice's generation");
    assert_eq!(notice["step"], saved["step"]);
    assert!(
        manifest_paths(notice)
            .iter()
            .all(|p| !p.starts_with("runs/")),
        "the log is not checkpoint content: {:?}",
        manifest_paths(notice)
    );
    assert!(rig.dir.join(TENSORBOARD_FILE).exists());
}

#[test]
fn restore_keeps_a_newer_local_checkpoint_and_replaces_an_older_one() {
    let rig = Rig::new("newer-local");
    upload_step_55(&rig);
    assert_eq!(
        rig.manifests()[0]["step"],
        55,
        "the step is read from the checkpoint"
    );

    // A volume that survived the pod holds a newer checkpoint: it is left alone.
    let volume = rig.work.path().join("volume");
    trainer::write_checkpoint(&volume, &shape(), 1055, WriteOptions::default()).expect("write");
    assert_restore_keeps_1055(&rig, &volume);
    trainer::load_checkpoint(&volume.join("checkpoint-1055")).expect("intact");

    // An older one is replaced, and the local logs stay.
    let older = rig.work.path().join("older");
    trainer::write_checkpoint(&older, &shape(), 12, WriteOptions::default()).expect("write");
    std::fs::create_dir_all(older.join("runs/x")).expect("mkdir");
    std::fs::write(older.join("runs/x/events.out.tfevents.1"), b"history").expect("write");
    let output = rig.sidecar_command("restore", &older, &[]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        trainer::list_checkpoints(&older).expect("ls"),
        vec![(55, older.join("checkpoint-55"))]
    );
    assert_eq!(
        std::fs::read(older.join("runs/x/events.out.tfevents.1")).expect("the log"),
        b"history"
    );
}

#[test]
fn restore_keeps_a_newer_local_checkpoint_whose_done_marker_is_left_from_an_older_save() {
    let rig = Rig::new("stale-marker-local");
    upload_step_55(&rig);

    // The marker of a notice save at step 5; the trainer went on saving, up to 1055, without
    // writing it again (a trainer that marks only its notice saves).
    let volume = rig.work.path().join("volume");
    trainer::write_checkpoint(&volume, &shape(), 1055, WriteOptions::default()).expect("write");
    std::fs::write(volume.join(".nerve-done"), "step=5\nreason=notice\n").expect("marker");
    assert_restore_keeps_1055(&rig, &volume);
}

/// Commits a generation of `checkpoint-55/` for the rig's job.
fn upload_step_55(rig: &Rig) {
    let source = rig.work.path().join("source");
    trainer::write_checkpoint(&source, &shape(), 55, WriteOptions::default()).expect("write");
    let output = rig.sidecar_command("upload", &source, &[]);
    assert!(output.status.success(), "{output:?}");
}

/// Restores over `volume`, which holds `checkpoint-1055/`, and asserts it was left alone.
fn assert_restore_keeps_1055(rig: &Rig, volume: &std::path::Path) {
    let output = rig.sidecar_command("restore", volume, &[]);
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(said.contains("kept") && said.contains("1055"), "{said}");
    assert_eq!(
        trainer::list_checkpoints(volume).expect("ls"),
        vec![(1055, volume.join("checkpoint-1055"))],
        "restore replaced checkpoint-1055 with the older generation of step 55"
    );
}

#[test]
fn a_link_to_a_file_outside_the_directory_never_reaches_the_store() {
    let rig = Rig::new("link-out");
    let secret_dir = tempfile::tempdir().expect("tempdir");
    let secret = secret_dir.path().join("secret");
    let secret_bytes = b"-----BEGIN PRIVATE KEY----- not for the bucket";
    std::fs::write(&secret, secret_bytes).expect("write");
    let link = format!("x={}", secret.display());
    let trainer = rig.trainer(&rig.dir, &["--done-marker", "DONE", "--link", &link]);
    trainer.event("started", STARTUP_TIMEOUT);
    let sidecar = rig.sidecar(&closed_port_url(), &["--done-marker", "DONE"]);
    rig.imds.set_spot_interruption("terminate", in_seconds(120));
    let manifests = rig.wait_manifests(1, CHECKPOINT_TIMEOUT, &sidecar);
    assert!(!manifest_paths(&manifests[0]).contains(&"x".to_owned()));
    assert!(
        stored_objects(&rig)
            .iter()
            .all(|bytes| !bytes.windows(secret_bytes.len()).any(|w| w == secret_bytes)),
        "the secret's bytes reached the bucket"
    );
    assert!(
        sidecar
            .output()
            .contains("skipping a symbolic link that points outside"),
        "{}",
        sidecar.output()
    );
}

#[test]
fn a_trainer_killed_mid_save_does_not_get_its_torn_checkpoint_committed() {
    let rig = Rig::new("torn");
    let mut trainer = rig.trainer(
        &rig.dir,
        &["--checkpoint-at-start", "--write-pause", "300ms"],
    );
    let first = trainer.event("checkpoint", STARTUP_TIMEOUT);
    let sidecar = rig.sidecar(
        &closed_port_url(),
        &["--background-sync", "true", "--sync-interval", "300ms"],
    );
    rig.wait_manifests(1, CHECKPOINT_TIMEOUT, &sidecar);

    rig.imds.set_spot_interruption("terminate", in_seconds(120));
    trainer.event("signal", CHECKPOINT_TIMEOUT);
    // What a drain's SIGTERM does to a trainer without a handler, or the OOM killer.
    std::thread::sleep(Duration::from_millis(700));
    trainer.send(Signal::SIGKILL);
    trainer.wait_exit(EXIT_TIMEOUT);
    let torn = sidecar.wait_json("the torn checkpoint refused", CHECKPOINT_TIMEOUT, |v| {
        v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("its save did not finish"))
    });
    let message = torn["fields"]["message"].as_str().expect("message");
    assert!(message.contains("trainer_state.json"), "{message}");
    assert_eq!(
        rig.manifests().len(),
        1,
        "nothing is committed over the last good generation"
    );
    let resumed = rig.restore_and_verify();
    assert_eq!(resumed["step"], first["step"]);
    assert_eq!(resumed["digest"], first["digest"]);
}

#[test]
fn rotating_an_older_checkpoint_during_the_notice_upload_still_commits_the_new_one() {
    let rig = Rig::new("rotation");
    let trainer = rig.trainer(
        &rig.dir,
        &[
            "--checkpoint-at-start",
            "--done-marker",
            "DONE",
            "--save-total-limit",
            "1",
            "--rotate-after-marker",
            "300ms",
        ],
    );
    let old = trainer.event("checkpoint", STARTUP_TIMEOUT);
    let old_dir = Path::new(old["path"].as_str().expect("path"))
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    // The store is slow for the old checkpoint's files, so the rotation lands mid-upload.
    let proxy = FaultProxy::start(rig.s3.addr()).expect("proxy");
    proxy.add_rule(
        Rule::new(Fault::Delay(Duration::from_secs(1)))
            .method("PUT")
            .path_contains(&format!("{old_dir}/")),
    );
    let endpoint = proxy.endpoint();
    let sidecar = rig.sidecar_with_env(
        &closed_port_url(),
        &["--done-marker", "DONE"],
        &[("AWS_ENDPOINT_URL", endpoint.as_str())],
    );
    rig.imds.set_spot_interruption("terminate", in_seconds(120));
    let saved = trainer.wait_json("the signal's checkpoint", CHECKPOINT_TIMEOUT, |v| {
        v["event"] == "checkpoint" && v["reason"] == "signal"
    });
    trainer.event("rotated", CHECKPOINT_TIMEOUT);
    let manifests = rig.wait_manifests(1, CHECKPOINT_TIMEOUT, &sidecar);
    assert!(
        !proxy.injected().is_empty(),
        "the old checkpoint was being uploaded"
    );
    let listed = manifest_paths(&manifests[0]);
    let new_dir = format!("checkpoint-{}", saved["step"]);
    assert!(listed.iter().any(|p| p.starts_with(&format!("{new_dir}/"))));
    assert!(
        listed
            .iter()
            .all(|p| !p.starts_with(&format!("{old_dir}/"))),
        "the rotated checkpoint drops out whole: {listed:?}"
    );
    let resumed = rig.restore_and_verify();
    assert_eq!(resumed["step"], saved["step"]);
    assert_eq!(resumed["digest"], saved["digest"]);
}

#[test]
fn sigterm_after_the_trainer_exited_uploads_the_newest_whole_checkpoint() {
    let rig = Rig::new("sigterm-no-trainer");
    let mut trainer = rig.trainer(&rig.dir, &["--checkpoint-at-start"]);
    let saved = trainer.event("checkpoint", STARTUP_TIMEOUT);
    let mut sidecar = rig.sidecar(&closed_port_url(), &["--termination-grace", "60s"]);
    // Kubernetes stops a native sidecar only after the trainer container has exited.
    trainer.send(Signal::SIGKILL);
    trainer.wait_exit(EXIT_TIMEOUT);
    sidecar.send(Signal::SIGTERM);
    let status = sidecar.wait_exit(CHECKPOINT_TIMEOUT);
    assert!(status.success(), "{status}:\n{}", sidecar.output());
    let manifests = rig.manifests();
    assert_eq!(manifests.len(), 1, "{}", sidecar.output());
    assert_eq!(manifests[0]["notice"]["kind"], "sigterm");
    assert_eq!(manifests[0]["step"], saved["step"]);
    assert!(
        !sidecar.output().contains("handles SIGUSR1"),
        "a missing handler is not an error once the trainer is gone:\n{}",
        sidecar.output()
    );
    let resumed = rig.restore_and_verify();
    assert_eq!(resumed["digest"], saved["digest"]);
}

#[test]
fn only_the_trainers_container_is_signalled() {
    let rig = Rig::new("container");
    let trainer = rig.trainer_with_env(
        &rig.dir,
        &["--done-marker", "DONE"],
        &[("NERVE_CONTAINER", "trainer")],
    );
    // Another container's process that handles every signal and matches --target, as a Go
    // proxy would.
    let mut proxy_like = rig.trainer_with_env(
        &rig.dir.join("elsewhere"),
        &[],
        &[("NERVE_CONTAINER", "istio-proxy")],
    );
    trainer.event("started", STARTUP_TIMEOUT);
    proxy_like.event("started", STARTUP_TIMEOUT);
    let sidecar = rig.sidecar(
        &closed_port_url(),
        &["--done-marker", "DONE", "--container", "trainer"],
    );
    rig.imds.set_spot_interruption("terminate", in_seconds(120));
    trainer.event("signal", CHECKPOINT_TIMEOUT);
    rig.wait_manifests(1, CHECKPOINT_TIMEOUT, &sidecar);
    assert!(proxy_like.is_alive());
    assert!(
        proxy_like
            .json_lines()
            .iter()
            .all(|e| e["event"] != "signal"),
        "the other container was signalled"
    );
}

/// Runs `script` with `sh` in a new mount namespace, or says why that is not possible here.
fn in_mount_namespace(script: &str, env: &[(&str, String)]) -> Option<std::process::Output> {
    let probe = Command::new("unshare").args(["-m", "true"]).output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!(
            "SKIPPED: cannot create a mount namespace here (`unshare -m` needs root or user \
             namespaces): {probe:?}"
        );
        return None;
    }
    let output = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-ec", script])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("unshare");
    Some(output)
}

#[test]
fn restore_into_a_bind_mounted_directory_under_a_read_only_parent() {
    let rig = Rig::new("bind-mount");
    let source = rig.work.path().join("source");
    trainer::write_checkpoint(&source, &shape(), 7, WriteOptions::default()).expect("write");
    assert!(rig.sidecar_command("upload", &source, &[]).status.success());

    // What systemd's ProtectSystem=strict with ReadWritePaths= builds: a read-only tree with
    // the checkpoint directory bind-mounted writable inside it. Same device as its parent.
    let parent = rig.work.path().join("state");
    let backing = rig.work.path().join("backing");
    std::fs::create_dir_all(parent.join("ckpt")).expect("mkdir");
    std::fs::create_dir_all(&backing).expect("mkdir");
    let mut env: Vec<(&str, String)> = rig.s3.client_env();
    env.push(("PARENT", parent.display().to_string()));
    env.push(("BACKING", backing.display().to_string()));
    env.push((
        "SIDECAR",
        nerve_tests::binary_path("nerve-sidecar")
            .display()
            .to_string(),
    ));
    env.push(("JOB", rig.job.clone()));
    let script = r#"
        mount --bind "$PARENT" "$PARENT"
        mount -o remount,bind,ro "$PARENT"
        mount --bind "$BACKING" "$PARENT/ckpt"
        "$SIDECAR" restore --dir "$PARENT/ckpt" --dest s3://ckpt/jobs --job "$JOB" --path-style
    "#;
    let started = Instant::now();
    let Some(output) = in_mount_namespace(script, &env) else {
        return;
    };
    assert!(
        output.status.success(),
        "restore into a bind mount failed after {:?}: {}",
        started.elapsed(),
        String::from_utf8_lossy(&output.stderr)
    );
    let state = trainer::load_checkpoint(&backing.join("checkpoint-7")).expect("restored");
    assert_eq!(state.global_step, 7);
    let leftovers: Vec<_> = std::fs::read_dir(&backing)
        .expect("ls")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers, ["checkpoint-7"], "no staging left behind");
}
