//! `nerve-sidecar run` with a Python trainer that uses the `nerve_trainer` core
//! (`integrations/python`), end to end: the real agent and metadata simulator, the real S3
//! server, the real sidecar, and `integrations/python/tests/hf_layout_trainer.py`, which writes
//! Hugging Face-shaped checkpoints (`checkpoint-N/`, `trainer_state.json` last) and the done
//! marker only after fsyncing them.
//!
//! Skipped, with the reason printed, where `python3` is missing. Every sidecar gets a `--target`
//! matching only its own trainer, because tests share one process namespace, unlike a pod.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nerve_tests::pod::{
    CHECKPOINT_TIMEOUT, EXIT_TIMEOUT, Proc, Rig, STARTUP_TIMEOUT, closed_port_url, in_seconds,
    wait_for,
};
use nix::sys::signal::Signal;
use serde_json::Value;

/// Where the drain's SIGTERM lands after the notice: Karpenter and the node termination handler
/// drain within seconds of the same notice.
const DRAIN_AFTER_NOTICE: Duration = Duration::from_secs(1);

/// What the trainer exits with after the save that answers SIGTERM (128 + SIGTERM).
const TERMINATED_EXIT_CODE: i32 = 143;

/// The marker file both sides default to: the injector sets nothing, the integration and the
/// sidecar agree.
const DONE_MARKER: &str = ".nerve-done";

/// The trainer script and the package source it imports (no install needed).
fn python_paths() -> (PathBuf, PathBuf) {
    let integration = Path::new(env!("CARGO_MANIFEST_DIR")).join("../integrations/python");
    (
        integration.join("tests/hf_layout_trainer.py"),
        integration.join("src"),
    )
}

/// False, with the reason printed, when there is no `python3` to run the trainer.
fn python_available() -> bool {
    match Command::new("python3").arg("--version").output() {
        Ok(output) if output.status.success() => true,
        _ => {
            eprintln!("skipped: python3 is not installed, so the Python trainer cannot run");
            false
        }
    }
}

/// The Python trainer on `dir`, as the injector would start it: `NERVE_CHECKPOINT_DIR` set.
fn python_trainer(dir: &Path, extra: &[&str]) -> Proc {
    let (script, source) = python_paths();
    Proc::spawn(
        "python trainer",
        Command::new("python3")
            .arg(script)
            .arg("--dir")
            .arg(dir)
            .args(extra)
            .env("PYTHONPATH", source)
            .env("NERVE_CHECKPOINT_DIR", dir)
            .env_remove("NERVE_DONE_MARKER")
            .env_remove("NERVE_SIGNAL"),
    )
}

/// The done marker's `key=value` lines in the trainer's directory.
fn marker(rig: &Rig) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(rig.dir.join(DONE_MARKER)).expect("done marker");
    text.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// `nerve-sidecar restore` into a fresh directory, then the Python trainer's `--verify` there:
/// the checkpoint the restored marker names, byte for byte. Returns its event.
fn restore_and_verify(rig: &Rig) -> Value {
    let restored = rig.work.path().join("restored");
    std::fs::create_dir(&restored).expect("restore dir");
    let output = rig.sidecar_command("restore", &restored, &[]);
    assert!(
        output.status.success(),
        "restore failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut verify = python_trainer(&restored, &["--verify"]);
    let status = verify.wait_exit(EXIT_TIMEOUT);
    assert!(status.success(), "verify failed:\n{}", verify.output());
    verify.event("resumed", Duration::from_secs(5))
}

fn marker_field<'a>(marker: &'a [(String, String)], key: &str) -> &'a str {
    marker
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("marker has no {key}: {marker:?}"))
}

#[test]
fn a_notice_commits_the_step_the_python_trainer_marked_and_it_resumes_there() {
    if !python_available() {
        return;
    }
    let rig = Rig::new("python-notice");
    let (_agent, agent_url) = rig.agent();
    let mut trainer = python_trainer(&rig.dir, &[]);
    trainer.event("started", STARTUP_TIMEOUT);
    // No --done-marker: the sidecar's default is the integration's.
    let mut sidecar = rig.sidecar(&agent_url, &[]);
    sidecar.log("following the agent's notice stream", STARTUP_TIMEOUT);

    rig.imds.set_spot_interruption("terminate", in_seconds(120));
    let saved = trainer.event("checkpoint", CHECKPOINT_TIMEOUT);
    assert_eq!(saved["reason"], "notice");
    let committed = sidecar.log("checkpoint committed", CHECKPOINT_TIMEOUT);
    assert_eq!(committed["fields"]["completion"], "marker");
    let manifests = rig.manifests();
    assert_eq!(manifests.len(), 1);
    assert_eq!(manifests[0]["step"], saved["step"]);
    let marker = marker(&rig);
    assert_eq!(marker_field(&marker, "step"), saved["step"].to_string());
    assert_eq!(marker_field(&marker, "reason"), "notice");
    let path = format!("checkpoint-{}", saved["step"]);
    assert_eq!(marker_field(&marker, "path"), path);
    assert!(trainer.is_alive(), "a notice does not end the run");

    sidecar.send(Signal::SIGTERM);
    assert!(sidecar.wait_exit(EXIT_TIMEOUT).success());
    assert_eq!(rig.manifests().len(), 1, "no second checkpoint on SIGTERM");

    let resumed = restore_and_verify(&rig);
    assert_eq!(resumed["step"], saved["step"]);
    assert_eq!(resumed["path"], path);
}

#[test]
fn the_drain_race_sigterm_during_the_python_trainers_notice_save_still_commits_it() {
    if !python_available() {
        return;
    }
    let rig = Rig::new("python-drain");
    // A slow save (four state files, 0.4 s before each) so the drain's SIGTERM lands inside it.
    let mut trainer = python_trainer(&rig.dir, &["--file-pause", "0.4"]);
    trainer.event("started", STARTUP_TIMEOUT);
    let mut sidecar = rig.sidecar(&closed_port_url(), &[]);

    rig.imds.set_spot_interruption("terminate", in_seconds(120));
    let saving = trainer.event("saving", CHECKPOINT_TIMEOUT);
    std::thread::sleep(DRAIN_AFTER_NOTICE);
    trainer.send(Signal::SIGTERM);
    let status = trainer.wait_exit(EXIT_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(TERMINATED_EXIT_CODE),
        "{}",
        trainer.output()
    );
    let checkpoints: Vec<Value> = trainer
        .json_lines()
        .into_iter()
        .filter(|e| e["event"] == "checkpoint")
        .collect();
    assert_eq!(
        checkpoints.len(),
        1,
        "the save in progress answers SIGTERM too:\n{}",
        trainer.output()
    );
    assert_eq!(checkpoints[0]["step"], saving["step"]);

    // Kubernetes stops the native sidecar only after the trainer exited.
    sidecar.send(Signal::SIGTERM);
    let status = sidecar.wait_exit(CHECKPOINT_TIMEOUT);
    assert!(status.success(), "exit status {status}");
    let manifests = wait_for("the commit", Duration::from_secs(1), || {
        let manifests = rig.manifests();
        (!manifests.is_empty()).then_some(manifests)
    })
    .unwrap_or_else(|| panic!("nothing committed; sidecar said:\n{}", sidecar.output()));
    assert_eq!(manifests.len(), 1);
    assert_eq!(manifests[0]["step"], saving["step"]);
    let committed = sidecar.log("checkpoint committed", Duration::from_secs(1));
    assert_eq!(committed["fields"]["completion"], "marker");

    let resumed = restore_and_verify(&rig);
    assert_eq!(resumed["step"], saving["step"]);
}
