//! Bad input gets a clear error: flag values both binaries refuse (exit 64, naming the flag)
//! and notice lines a sidecar must accept from a newer agent or refuse from a broken one.

use std::path::Path;
use std::process::{Command, Output};

use nerve_tests::process::run_bounded;

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn invalid_flag_values_exit_64_and_name_the_flag_on_both_binaries() {
    let sidecar = nerve_tests::binary_path("nerve-sidecar");
    let agent = nerve_tests::binary_path("nerve-agent");
    let store = ["--dest", "s3://bucket/p", "--job", "j", "--dir", "/tmp"];
    let cases: Vec<(&Path, Vec<&str>, &str)> = vec![
        (
            &sidecar,
            [&["upload"][..], &store, &["--concurrency", "0"]].concat(),
            "--concurrency",
        ),
        (
            &sidecar,
            [&["upload"][..], &store, &["--concurrency", "many"]].concat(),
            "--concurrency",
        ),
        (
            &sidecar,
            [&["upload"][..], &store, &["--part-size", "1KiB"]].concat(),
            "--part-size",
        ),
        (
            &sidecar,
            [&["upload"][..], &store, &["--checksum", "md5"]].concat(),
            "--checksum",
        ),
        (
            &sidecar,
            vec![
                "restore", "--dest", "bucket/p", "--job", "j", "--dir", "/tmp",
            ],
            "--dest",
        ),
        (
            &sidecar,
            vec![
                "restore",
                "--dest",
                "s3://Bad_Bucket",
                "--job",
                "j",
                "--dir",
                "/tmp",
            ],
            "--dest",
        ),
        (
            &sidecar,
            vec![
                "restore",
                "--dest",
                "s3://bucket/a/../b",
                "--job",
                "j",
                "--dir",
                "/tmp",
            ],
            "--dest",
        ),
        (
            &sidecar,
            [
                &["restore"][..],
                &store,
                &["--generation", "latest; rm -rf /"],
            ]
            .concat(),
            "--generation",
        ),
        (
            &sidecar,
            vec![
                "prune",
                "--dest",
                "s3://bucket/p",
                "--job",
                "j",
                "--keep",
                "-1",
            ],
            "--keep",
        ),
        (
            &sidecar,
            [&["run"][..], &store, &["--signal", "SIGNOPE"]].concat(),
            "--signal",
        ),
        (
            &sidecar,
            [&["run"][..], &store, &["--target", "(unclosed"]].concat(),
            "--target",
        ),
        (
            &sidecar,
            [&["run"][..], &store, &["--listen", "not-an-address"]].concat(),
            "--listen",
        ),
        (
            &sidecar,
            vec![
                "--log-format",
                "xml",
                "list",
                "--dest",
                "s3://bucket/p",
                "--job",
                "j",
            ],
            "--log-format",
        ),
        (&agent, vec!["--poll-interval", "1ms"], "--poll-interval"),
        (&agent, vec!["--poll-interval", "soon"], "--poll-interval"),
        (&agent, vec!["--cloud", "mars"], "--cloud"),
        (
            &agent,
            vec!["--metadata-url", "not a url"],
            "--metadata-url",
        ),
        (&agent, vec!["--listen", "localhost"], "--listen"),
        (
            &agent,
            vec!["--cordon-on", "spot-interruption,meteor"],
            "--cordon-on",
        ),
        (&agent, vec!["--kubernetes", "maybe"], "--kubernetes"),
    ];
    for (binary, args, flag) in cases {
        let output = run_bounded(
            Command::new(binary)
                .args(&args)
                .env_remove("KUBECONFIG")
                .env_remove("KUBERNETES_SERVICE_HOST")
                .env("AWS_EC2_METADATA_DISABLED", "true"),
        );
        let errors = stderr(&output);
        assert_eq!(
            output.status.code(),
            Some(64),
            "{} {args:?} must exit 64: {errors}",
            binary.display()
        );
        assert!(
            errors.contains(flag),
            "{args:?}: the message names {flag}: {errors}"
        );
    }
}

#[test]
fn notice_lines_with_unknown_fields_are_accepted_and_wrong_types_are_refused() {
    use nerve_notice::StreamEvent;
    let good = r#"{"type":"notice","notice":{"id":"spot-interruption/2026-11-22T09:30:36Z","kind":"spot-interruption","action":"terminate","deadline":"2026-11-22T09:30:36Z","detected_at":"2026-11-22T09:28:37.120Z","source":"aws"}}"#;
    assert!(serde_json::from_str::<StreamEvent>(good).is_ok());
    // A newer agent may add fields: an older sidecar still hears the notice.
    let extra = good.replace(
        r#""source":"aws""#,
        r#""source":"aws","region":"eu-west-1","v":2"#,
    );
    assert!(
        serde_json::from_str::<StreamEvent>(&extra).is_ok(),
        "{extra}"
    );
    for bad in [
        good.replace(r#""terminate""#, "42"),
        good.replace(
            r#""2026-11-22T09:30:36Z","detected_at""#,
            r#""tomorrow","detected_at""#,
        ),
        good.replace(
            r#""spot-interruption","action""#,
            r#""meteor-strike","action""#,
        ),
        good.replace(r#""aws"}"#, r#"null}"#),
        good.replace(r#""type":"notice""#, r#""type":"surprise""#),
        r#"{"type":"snapshot","notices":{"not":"a list"}}"#.to_owned(),
        "[1,2,3]".to_owned(),
        "\u{0}\u{1}garbage".to_owned(),
    ] {
        assert!(
            serde_json::from_str::<StreamEvent>(&bad).is_err(),
            "accepted {bad}"
        );
    }
}
