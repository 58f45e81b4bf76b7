//! The demo's scenario, headless with a small training state: a Spot notice on a node with the
//! real agent, sidecar and trainer (and, with two ranks, on one of a job's two nodes); the facts
//! of its timeline are the assertions.

use std::time::Duration;

use nerve_tests::demo::{DEFAULT_BUCKET, DemoOptions, Timeline, run_demo};

fn options(work: &tempfile::TempDir, ranks: u32) -> DemoOptions {
    let bin_dir = nerve_tests::binary_path("nerve-agent")
        .parent()
        .expect("the binaries' directory")
        .to_path_buf();
    DemoOptions {
        size: 8 * 1024 * 1024,
        deadline: Duration::from_secs(120),
        s3_endpoint: None,
        bucket: DEFAULT_BUCKET.to_owned(),
        bin_dir,
        work: work.path().to_path_buf(),
        print: false,
        ranks,
    }
}

/// What holds of every run: the noticed machine alone cordoned, one generation committed in
/// time, every sidecar exiting 0, every rank resuming where it saved.
fn assert_safe_and_resumed(timeline: &Timeline, size: u64) {
    assert!(timeline.agent_saw_notice.is_some(), "{timeline:#?}");
    assert_eq!(
        timeline.taint.as_deref(),
        Some("nerve.io/interruption=spot-interruption:NoSchedule"),
        "{timeline:#?}"
    );
    assert!(timeline.disturbed_nodes.is_empty(), "{timeline:#?}");
    assert!(timeline.committed.is_some(), "{timeline:#?}");
    assert!(
        timeline.margin.is_some(),
        "committed after the deadline: {timeline:#?}"
    );
    assert_eq!(timeline.generations, 1, "{timeline:#?}");
    let step = timeline.ranks[0].saved_step;
    for rank in &timeline.ranks {
        assert!(rank.signal_delivered.is_some(), "{timeline:#?}");
        assert!(rank.checkpoint_complete.is_some(), "{timeline:#?}");
        assert!(rank.bytes_uploaded >= size, "{timeline:#?}");
        assert_eq!(rank.sidecar_exit_code, Some(0), "{timeline:#?}");
        assert!(rank.saved_step.is_some_and(|s| s > 0), "{timeline:#?}");
        assert_eq!(
            rank.saved_step, step,
            "every rank saves one step: {timeline:#?}"
        );
        assert_eq!(rank.resumed_step, rank.saved_step, "{timeline:#?}");
        assert_eq!(rank.resumed_digest, rank.saved_digest, "{timeline:#?}");
        assert!(rank.files_identical, "{timeline:#?}");
    }
    assert!(timeline.succeeded());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spot_notice_cordons_commits_one_generation_and_training_resumes_at_the_same_step() {
    let work = tempfile::tempdir().unwrap();
    let options = options(&work, 1);
    let timeline = run_demo(&options).await.unwrap();

    assert_eq!(timeline.ranks.len(), 1);
    assert_safe_and_resumed(&timeline, options.size);
    assert_eq!(timeline.published, None, "a single pod publishes nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_on_one_of_two_nodes_reaches_both_pods_and_both_ranks_resume_at_one_step() {
    let work = tempfile::tempdir().unwrap();
    let options = options(&work, 2);
    let timeline = run_demo(&options).await.unwrap();

    assert_eq!(timeline.noticed_rank, 1, "the notice is on the last node");
    assert_safe_and_resumed(&timeline, options.size);
    assert!(timeline.published.is_some(), "{timeline:#?}");
    let other = &timeline.ranks[0];
    assert!(
        matches!(other.heard_by.as_deref(), Some("peer" | "marker")),
        "{timeline:#?}"
    );
    assert_eq!(timeline.ranks[1].heard_by, None, "its own node's notice");
    for rank in &timeline.ranks {
        assert!(rank.part_committed.is_some(), "{timeline:#?}");
    }
    assert!(
        timeline
            .committed_generation
            .as_deref()
            .is_some_and(|g| g.starts_with("step-")),
        "a multi-pod generation is named by its step: {timeline:#?}"
    );
}
