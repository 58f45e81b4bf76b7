//! The demo's scenario, headless with a small training state: a Spot notice on a node with the
//! real agent, sidecar and trainer; the facts of its timeline are the assertions.

use std::time::Duration;

use nerve_tests::demo::{DEFAULT_BUCKET, DemoOptions, run_demo};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spot_notice_cordons_commits_one_generation_and_training_resumes_at_the_same_step() {
    let work = tempfile::tempdir().unwrap();
    let bin_dir = nerve_tests::binary_path("nerve-agent")
        .parent()
        .unwrap()
        .to_path_buf();
    let options = DemoOptions {
        size: 8 * 1024 * 1024,
        deadline: Duration::from_secs(120),
        s3_endpoint: None,
        bucket: DEFAULT_BUCKET.to_owned(),
        bin_dir,
        work: work.path().to_path_buf(),
        print: false,
    };
    let timeline = run_demo(&options).await.unwrap();

    assert!(timeline.agent_saw_notice.is_some(), "{timeline:#?}");
    assert_eq!(
        timeline.taint.as_deref(),
        Some("nerve.io/interruption=spot-interruption:NoSchedule"),
        "{timeline:#?}"
    );
    assert!(timeline.signal_delivered.is_some(), "{timeline:#?}");
    assert!(timeline.checkpoint_complete.is_some(), "{timeline:#?}");
    assert!(timeline.committed.is_some(), "{timeline:#?}");
    assert!(
        timeline.margin.is_some(),
        "committed after the deadline: {timeline:#?}"
    );
    assert_eq!(timeline.generations, 1, "{timeline:#?}");
    assert!(timeline.bytes_uploaded >= options.size, "{timeline:#?}");
    assert_eq!(timeline.sidecar_exit_code, Some(0), "{timeline:#?}");
    assert!(timeline.saved_step.unwrap() > 0, "{timeline:#?}");
    assert_eq!(timeline.resumed_step, timeline.saved_step, "{timeline:#?}");
    assert_eq!(
        timeline.resumed_digest, timeline.saved_digest,
        "{timeline:#?}"
    );
    assert!(timeline.files_identical, "{timeline:#?}");
    assert!(timeline.succeeded());
}
