//! The binary's command line: bad settings exit 64 naming the flag and what is valid.
//! (This file also makes `cargo test`/`nextest` build the `nerve-agent` binary that the
//! end-to-end tests in `tests/` run.)

use std::process::Command;

fn agent(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nerve-agent"))
        .args(args)
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("NODE_NAME")
        .env_remove("NERVE_CORDON_ON")
        .output()
        .expect("running nerve-agent")
}

#[test]
fn a_bad_value_exits_64_naming_the_flag_and_the_valid_values() {
    let output = agent(&["--cordon-on", "spot"]);
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--cordon-on"), "{stderr}");
    assert!(
        stderr.contains("spot-interruption, rebalance-recommendation"),
        "{stderr}"
    );

    let output = agent(&["--cloud", "ibm"]);
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("aws, gcp, azure"));

    let output = agent(&["--no-such-flag"]);
    assert_eq!(output.status.code(), Some(64));
}

#[test]
fn kubernetes_mode_without_a_node_name_exits_64() {
    let output = agent(&["--kubernetes", "on", "--listen", "127.0.0.1:0"]);
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--node-name"), "{stderr}");
}

#[test]
fn kubernetes_on_without_a_cluster_exits_64() {
    // An empty HOME: no ~/.kube/config to find.
    let home = tempfile::tempdir().expect("creating a temporary HOME");
    let output = Command::new(env!("CARGO_BIN_EXE_nerve-agent"))
        .args([
            "--kubernetes",
            "on",
            "--node-name",
            "n1",
            "--listen",
            "127.0.0.1:0",
        ])
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", home.path())
        .output()
        .expect("running nerve-agent");
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--kubernetes off"), "{stderr}");
}

#[test]
fn help_documents_every_flag_with_its_environment_variable() {
    let output = agent(&["--help"]);
    assert_eq!(output.status.code(), Some(0));
    let help = String::from_utf8_lossy(&output.stdout);
    for (flag, env) in [
        ("--metadata-url", "NERVE_METADATA_URL"),
        ("--cloud", "NERVE_CLOUD"),
        ("--poll-interval", "NERVE_POLL_INTERVAL"),
        ("--listen", "NERVE_LISTEN"),
        ("--node-name", "NODE_NAME"),
        ("--kubernetes", "NERVE_KUBERNETES"),
        ("--passive", "NERVE_PASSIVE"),
        ("--cordon-on", "NERVE_CORDON_ON"),
        ("--drain", "NERVE_DRAIN"),
    ] {
        assert!(
            help.contains(flag) && help.contains(env),
            "{flag} {env}\n{help}"
        );
    }
}
