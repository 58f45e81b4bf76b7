//! The command line as an operator meets it: bad settings exit 64 and name the flag.
//!
//! (This file also makes `cargo nextest run --workspace` build the `nerve-sidecar` binary,
//! which the end-to-end tests in the tests crate run.)

use assert_cmd::Command;

fn sidecar() -> Command {
    let mut cmd = Command::cargo_bin("nerve-sidecar").expect("nerve-sidecar is built");
    cmd.env_remove("NERVE_DEST")
        .env_remove("NERVE_JOB")
        .env_remove("NERVE_CHECKPOINT_DIR");
    cmd
}

fn stderr_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn an_unknown_flag_exits_64_and_names_the_flag() {
    let output = sidecar()
        .args(["upload", "--bogus"])
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(64));
    assert!(
        stderr_of(&output).contains("--bogus"),
        "{}",
        stderr_of(&output)
    );
}

#[test]
fn a_missing_destination_exits_64_and_names_the_flag_and_variable() {
    let output = sidecar()
        .args(["upload", "--dir", "/tmp", "--job", "j"])
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(64));
    let stderr = stderr_of(&output);
    assert!(stderr.contains("--dest"), "{stderr}");
}

#[test]
fn a_destination_that_is_not_an_s3_url_exits_64_with_the_fix() {
    let output = sidecar()
        .args([
            "restore",
            "--dir",
            "/tmp/x",
            "--job",
            "j",
            "--dest",
            "my-bucket/prefix",
        ])
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(64));
    assert!(
        stderr_of(&output).contains("s3://bucket/prefix"),
        "{}",
        stderr_of(&output)
    );
}

#[test]
fn a_part_size_below_the_s3_minimum_exits_64() {
    let output = sidecar()
        .args([
            "upload",
            "--dir",
            "/tmp",
            "--job",
            "j",
            "--dest",
            "s3://bucket/p",
            "--part-size",
            "1MiB",
        ])
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(64));
    let stderr = stderr_of(&output);
    assert!(
        stderr.contains("--part-size") && stderr.contains("5MiB"),
        "{stderr}"
    );
}

#[test]
fn uploading_a_directory_that_does_not_exist_exits_64() {
    let output = sidecar()
        .args([
            "upload",
            "--dir",
            "/nonexistent/ckpt",
            "--job",
            "j",
            "--dest",
            "s3://bucket/p",
        ])
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(64));
    assert!(
        stderr_of(&output).contains("/nonexistent/ckpt"),
        "{}",
        stderr_of(&output)
    );
}

#[test]
fn help_shows_the_transfer_defaults() {
    let output = sidecar().args(["upload", "--help"]).output().expect("runs");
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("[default: 16]"), "{stdout}");
    assert!(stdout.contains("[default: 32MiB]"), "{stdout}");
    assert!(stdout.contains("NERVE_DEST"), "{stdout}");
}
