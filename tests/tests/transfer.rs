//! End to end: the real `nerve-sidecar upload/restore/list/prune` against a real S3-protocol
//! server over HTTP (s3s + s3s-fs), sometimes through a proxy that fails requests.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use nerve_store::{
    ChecksumMode, Destination, Generation, Store, StoreConfig, UploadError, UploadOptions,
};
use nerve_tests::fault_proxy::{Fault, FaultProxy, Rule};
use nerve_tests::s3::{ACCESS_KEY, REGION, S3Server, SECRET_KEY};
use tokio_util::sync::CancellationToken;

const BUCKET: &str = "checkpoints";
const PREFIX: &str = "team/runs";
const MIB: usize = 1024 * 1024;
/// Every command gets far longer than it needs on a loaded 2-core machine; a hang fails.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

struct Harness {
    server: S3Server,
    work: tempfile::TempDir,
}

impl Harness {
    fn new() -> Harness {
        let server = S3Server::start().expect("S3 server starts");
        server.create_bucket(BUCKET).expect("bucket");
        Harness {
            server,
            work: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    /// Runs `nerve-sidecar <subcommand> --dest ... --job <job> --path-style <args>` against
    /// `endpoint` (the server, or a proxy in front of it).
    fn sidecar(&self, endpoint: &str, job: &str, subcommand: &str, args: &[&str]) -> Output {
        let mut cmd = assert_cmd::Command::new(nerve_tests::binary_path("nerve-sidecar"));
        for (key, value) in self.server.client_env() {
            cmd.env(key, value);
        }
        cmd.env("AWS_ENDPOINT_URL", endpoint)
            .env("RUST_LOG", "info")
            .env_remove("AWS_MAX_ATTEMPTS")
            .arg(subcommand)
            .args([
                "--dest",
                &format!("s3://{BUCKET}/{PREFIX}"),
                "--job",
                job,
                "--path-style",
            ])
            .args(args)
            .timeout(COMMAND_TIMEOUT);
        cmd.output().expect("nerve-sidecar runs")
    }

    fn upload(&self, job: &str, dir: &Path, extra: &[&str]) -> Output {
        let dir = dir.to_str().expect("utf-8");
        let mut args = vec!["--dir", dir, "--part-size", "5MiB"];
        args.extend_from_slice(extra);
        self.sidecar(&self.server.endpoint(), job, "upload", &args)
    }

    fn restore(&self, job: &str, dir: &Path, extra: &[&str]) -> Output {
        let dir = dir.to_str().expect("utf-8");
        let mut args = vec!["--dir", dir, "--part-size", "5MiB"];
        args.extend_from_slice(extra);
        self.sidecar(&self.server.endpoint(), job, "restore", &args)
    }

    /// Where the store keeps the object with this key.
    fn object(&self, key: &str) -> PathBuf {
        self.server.object_path(BUCKET, key)
    }

    fn generation_dir(&self, job: &str, generation: &str) -> PathBuf {
        self.object(&format!("{PREFIX}/{job}/gen/{generation}"))
    }

    fn manifest_path(&self, job: &str, generation: &str) -> PathBuf {
        self.object(&format!("{PREFIX}/{job}/gen/{generation}.manifest.json"))
    }

    /// Uploads the standard checkpoint (into `source`) as `job`; returns the generation, its
    /// manifest's path in the store and the manifest, for tests that rewrite it.
    fn committed_manifest(&self, job: &str) -> (String, PathBuf, serde_json::Value) {
        let source = self.path("source");
        write_checkpoint(&source);
        let generation = committed_generation(&self.upload(job, &source, &[]));
        let path = self.manifest_path(job, &generation);
        let manifest =
            serde_json::from_slice(&std::fs::read(&path).expect("manifest")).expect("json");
        (generation, path, manifest)
    }

    fn manifests(&self, job: &str) -> Vec<String> {
        let dir = self.object(&format!("{PREFIX}/{job}/gen"));
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|n| n.strip_suffix(".manifest.json").map(str::to_owned))
            .collect();
        names.sort();
        names
    }

    async fn store(&self, endpoint: &str, job: &str) -> Store {
        let config = Store::config_loader()
            .endpoint_url(endpoint)
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                ACCESS_KEY, SECRET_KEY, None, None, "test",
            ))
            .region(aws_sdk_s3::config::Region::new(REGION))
            .load()
            .await;
        let config_of_job = StoreConfig {
            dest: Destination::parse(&format!("s3://{BUCKET}/{PREFIX}")).expect("dest"),
            job: job.to_owned(),
            path_style: true,
            checksum: ChecksumMode::Crc32c,
        };
        Store::from_sdk_config(&config, &config_of_job)
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[track_caller]
fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        stdout(output),
        stderr(output)
    );
}

/// The generation id from "committed generation <id>: ...".
#[track_caller]
fn committed_generation(output: &Output) -> String {
    assert_success(output);
    let out = stdout(output);
    let line = out
        .lines()
        .find(|l| l.starts_with("committed generation "))
        .unwrap_or_else(|| panic!("no summary line in {out}"));
    let id = line["committed generation ".len()..]
        .split(':')
        .next()
        .expect("id")
        .to_owned();
    Generation::parse(&id).expect("valid generation id");
    id
}

/// Deterministic bytes that do not compress or repeat at part boundaries.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, bytes).expect("write");
}

/// A checkpoint-like tree: a file of several parts (at 5 MiB parts), one of exactly one part,
/// nested folders, an empty file, an executable.
fn write_checkpoint(dir: &Path) {
    write(
        &dir.join("model.safetensors"),
        &pseudo_random(3 * 5 * MIB + 12_345, 1),
    );
    write(&dir.join("optimizer/exact.bin"), &pseudo_random(5 * MIB, 2));
    write(
        &dir.join("nested/deeper/still/config.json"),
        br#"{"step": 1200}"#,
    );
    write(&dir.join("nested/empty"), b"");
    write(&dir.join("run.sh"), b"#!/bin/sh\necho resume\n");
    std::fs::set_permissions(dir.join("run.sh"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
}

/// Every file under `dir` with its bytes and permission bits, sorted.
fn tree(dir: &Path) -> Vec<(String, Vec<u8>, u32)> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current).expect("read dir") {
            let entry = entry.expect("entry");
            let path = entry.path();
            if entry.file_type().expect("type").is_dir() {
                pending.push(path);
            } else {
                let rel = path
                    .strip_prefix(dir)
                    .expect("inside")
                    .to_string_lossy()
                    .into_owned();
                let mode = entry.metadata().expect("meta").permissions().mode() & 0o777;
                out.push((rel, std::fs::read(&path).expect("read"), mode));
            }
        }
    }
    out.sort();
    out
}

#[track_caller]
fn assert_same_tree(expected: &Path, actual: &Path) {
    let (expected, actual) = (tree(expected), tree(actual));
    let names = |t: &[(String, Vec<u8>, u32)]| t.iter().map(|f| f.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&expected), names(&actual), "same files");
    for (e, a) in expected.iter().zip(&actual) {
        assert!(
            e.1 == a.1,
            "{} differs ({} vs {} bytes)",
            e.0,
            e.1.len(),
            a.1.len()
        );
        assert_eq!(e.2, a.2, "{} mode", e.0);
    }
}

/// Entries beside `dir` (staging or swap leftovers would show up here).
fn siblings(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.parent().expect("parent"))
        .expect("read parent")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

#[test]
fn round_trips_a_directory_byte_for_byte() {
    let h = Harness::new();
    let source = h.path("source");
    write_checkpoint(&source);
    let generation = committed_generation(&h.upload("llama", &source, &[]));
    assert_eq!(h.manifests("llama"), std::slice::from_ref(&generation));

    let listed = h.sidecar(&h.server.endpoint(), "llama", "list", &["--json"]);
    assert_success(&listed);
    assert!(stdout(&listed).contains(&generation), "{}", stdout(&listed));

    // Restore over a directory holding something else: it is replaced, not merged.
    let restored = h.path("restored");
    write(&restored.join("stale.bin"), b"from an older run");
    let output = h.restore("llama", &restored, &[]);
    assert_success(&output);
    assert!(stdout(&output).contains(&format!("restored generation {generation}")));
    assert_same_tree(&source, &restored);
    assert_eq!(
        siblings(&restored),
        ["restored", "source"],
        "no staging left behind"
    );
}

#[test]
fn round_trips_with_no_checksum_headers_for_stores_that_reject_them() {
    let h = Harness::new();
    // A store that answers 400 to any request carrying a checksum header, as several
    // S3-compatible stores do.
    let proxy = FaultProxy::start(h.server.addr()).expect("proxy");
    proxy.add_rule(Rule::new(Fault::InvalidArgument).header_contains("checksum"));
    let endpoint = proxy.endpoint();
    let source = h.path("source");
    write_checkpoint(&source);
    let dir = source.to_str().expect("utf-8");

    // With the default (--checksum crc32c) this store refuses the upload, and the error says
    // what to do about it.
    let refused = h.sidecar(
        &endpoint,
        "job",
        "upload",
        &["--dir", dir, "--part-size", "5MiB"],
    );
    assert!(!refused.status.success(), "{}", stdout(&refused));
    assert!(
        stderr(&refused).contains("--checksum none"),
        "{}",
        stderr(&refused)
    );
    let refusals = proxy.injected().len();
    assert!(refusals > 0, "the store refused nothing");

    let generation = committed_generation(&h.sidecar(
        &endpoint,
        "job",
        "upload",
        &["--dir", dir, "--part-size", "5MiB", "--checksum", "none"],
    ));
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(h.manifest_path("job", &generation)).expect("manifest"),
    )
    .expect("json");
    // The manifest still carries a CRC32C per file, and restore still verifies it.
    assert!(
        manifest["files"]
            .as_array()
            .expect("files")
            .iter()
            .all(|f| f["crc32c"].as_str().is_some_and(|c| c.len() == 8))
    );
    let restored = h.path("restored");
    let restore_dir = restored.to_str().expect("utf-8");
    assert_success(&h.sidecar(
        &endpoint,
        "job",
        "restore",
        &["--dir", restore_dir, "--checksum", "none"],
    ));
    assert_same_tree(&source, &restored);
    assert_eq!(
        proxy.injected().len(),
        refusals,
        "a request of --checksum none carried a checksum header: {:?}",
        &proxy.injected()[refusals..]
    );
}

#[test]
fn a_second_upload_of_an_unchanged_directory_uploads_no_file_content() {
    let h = Harness::new();
    let source = h.path("source");
    write_checkpoint(&source);
    let first = committed_generation(&h.upload("job", &source, &[]));
    let second_output = h.upload("job", &source, &[]);
    let second = committed_generation(&second_output);
    assert_ne!(first, second);
    assert!(
        stdout(&second_output).contains("0 B uploaded"),
        "{}",
        stdout(&second_output)
    );
    assert!(
        !h.generation_dir("job", &second).exists(),
        "the second generation stored no objects"
    );

    // Change one file: only that one is uploaded, the rest still point at the first generation.
    write(
        &source.join("nested/deeper/still/config.json"),
        br#"{"step": 1300}"#,
    );
    let third = committed_generation(&h.upload("job", &source, &[]));
    let stored: Vec<_> = tree(&h.generation_dir("job", &third))
        .into_iter()
        .map(|f| f.0)
        .collect();
    assert_eq!(stored, ["nested/deeper/still/config.json"]);

    let restored = h.path("restored");
    assert_success(&h.restore("job", &restored, &[]));
    assert_same_tree(&source, &restored);
}

#[test]
fn retries_parts_the_store_fails_or_that_break_in_flight_and_commits() {
    let h = Harness::new();
    let proxy = FaultProxy::start(h.server.addr()).expect("proxy");
    proxy.add_rule(
        Rule::new(Fault::SlowDown)
            .method("PUT")
            .path_contains("partNumber=")
            .times(3),
    );
    proxy.add_rule(
        Rule::new(Fault::InternalError)
            .method("PUT")
            .path_contains("partNumber=")
            .times(2),
    );
    proxy.add_rule(
        Rule::new(Fault::ResetMidBody)
            .method("PUT")
            .path_contains("partNumber=")
            .times(2),
    );
    proxy.add_rule(
        Rule::new(Fault::Corrupt)
            .method("PUT")
            .path_contains("partNumber=")
            .times(1),
    );
    proxy.add_rule(
        Rule::new(Fault::Corrupt)
            .method("PUT")
            .path_contains("exact.bin")
            .times(1),
    );
    proxy.add_rule(
        Rule::new(Fault::SlowDown)
            .method("POST")
            .path_contains("uploadId=")
            .times(1),
    );

    let source = h.path("source");
    write_checkpoint(&source);
    let dir = source.to_str().expect("utf-8");
    let output = h.sidecar(
        &proxy.endpoint(),
        "job",
        "upload",
        &["--dir", dir, "--part-size", "5MiB"],
    );
    let generation = committed_generation(&output);
    assert_eq!(
        proxy.injected().len(),
        10,
        "every fault was hit: {:?}",
        proxy.injected()
    );
    assert!(h.server.incomplete_uploads().is_empty());

    let restored = h.path("restored");
    assert_success(&h.restore("job", &restored, &[]));
    assert_same_tree(&source, &restored);
    assert_eq!(h.manifests("job"), [generation]);
}

#[test]
fn a_store_that_keeps_failing_gives_a_non_zero_exit_no_manifest_and_no_open_uploads() {
    let h = Harness::new();
    let proxy = FaultProxy::start(h.server.addr()).expect("proxy");
    proxy.add_rule(
        Rule::new(Fault::InternalError)
            .method("PUT")
            .path_contains("partNumber=3"),
    );
    let source = h.path("source");
    write_checkpoint(&source);
    let dir = source.to_str().expect("utf-8");
    let mut cmd = assert_cmd::Command::new(nerve_tests::binary_path("nerve-sidecar"));
    for (key, value) in h.server.client_env() {
        cmd.env(key, value);
    }
    // Few SDK attempts per round keep the test short; the rounds and backoff are the same.
    let output = cmd
        .env("AWS_ENDPOINT_URL", proxy.endpoint())
        .env("AWS_MAX_ATTEMPTS", "2")
        .args([
            "upload",
            "--dir",
            dir,
            "--part-size",
            "5MiB",
            "--path-style",
        ])
        .args(["--dest", &format!("s3://{BUCKET}/{PREFIX}"), "--job", "job"])
        .timeout(COMMAND_TIMEOUT)
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(err.contains("uploading part 3 of"), "{err}");
    assert!(
        err.contains("UploadPart") && err.contains(BUCKET),
        "names operation and bucket: {err}"
    );
    assert!(h.manifests("job").is_empty(), "no manifest");
    assert!(
        h.server.incomplete_uploads().is_empty(),
        "{:?}",
        h.server.incomplete_uploads()
    );

    // The same through the S3 API: ListMultipartUploads finds nothing under the job.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let uploads = runtime.block_on(async {
        let store = h.store(&h.server.endpoint(), "job").await;
        store
            .client()
            .list_multipart_uploads()
            .bucket(BUCKET)
            .prefix(PREFIX)
            .send()
            .await
            .expect("ListMultipartUploads")
    });
    assert!(uploads.uploads().is_empty(), "{:?}", uploads.uploads());
}

/// Restores job `job` over a `ckpt` holding the trainer's current state, expects a failure,
/// checks `ckpt` is as it was and no staging directory is left; returns stderr.
fn failed_restore_leaves_the_directory(h: &Harness) -> String {
    let dir = h.path("ckpt");
    write(&dir.join("current.bin"), b"the trainer's current state");
    let before = tree(&dir);
    let output = h.restore("job", &dir, &[]);
    assert!(!output.status.success());
    assert_eq!(tree(&dir), before, "--dir untouched");
    assert_eq!(siblings(&dir), ["ckpt", "source"], "staging removed");
    stderr(&output)
}

#[test]
fn a_corrupted_object_fails_restore_and_leaves_the_directory_as_it_was() {
    let h = Harness::new();
    let source = h.path("source");
    write_checkpoint(&source);
    let generation = committed_generation(&h.upload("job", &source, &[]));
    let stored = h.object(&format!("{PREFIX}/job/gen/{generation}/model.safetensors"));
    let mut bytes = std::fs::read(&stored).expect("stored object");
    bytes[7 * MIB] ^= 0x01;
    std::fs::write(&stored, bytes).expect("tamper");

    let err = failed_restore_leaves_the_directory(&h);
    assert!(
        err.contains("model.safetensors") && err.contains("CRC32C"),
        "{err}"
    );
}

#[test]
fn a_missing_object_fails_restore_and_names_the_key() {
    let h = Harness::new();
    let source = h.path("source");
    write_checkpoint(&source);
    let generation = committed_generation(&h.upload("job", &source, &[]));
    let key = format!("{PREFIX}/job/gen/{generation}/nested/deeper/still/config.json");
    std::fs::remove_file(h.object(&key)).expect("delete object");
    let dir = h.path("ckpt");
    let output = h.restore("job", &dir, &[]);
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(err.contains(&key) && err.contains("GetObject"), "{err}");
    assert!(!dir.exists(), "nothing was created");
    assert_eq!(siblings(&dir), ["source"]);
}

#[test]
fn a_generation_larger_than_the_free_space_is_refused_before_anything_is_fetched() {
    let h = Harness::new();
    let (generation, manifest_path, mut manifest) = h.committed_manifest("job");
    // 4 PiB: no test machine has that much free, and a real restore would fetch for hours
    // before the disk filled.
    manifest["files"][0]["size"] = serde_json::Value::from(1u64 << 52);
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).expect("json")).expect("write");

    let err = failed_restore_leaves_the_directory(&h);
    assert!(
        err.contains("free on its filesystem") && err.contains(&generation),
        "{err}"
    );
}

#[test]
fn a_manifest_with_parent_or_absolute_paths_is_refused() {
    let h = Harness::new();
    let (_, manifest_path, original) = h.committed_manifest("job");

    let escape = h.path("escaped.txt");
    for evil in [
        "../escaped.txt",
        "nested/../../escaped.txt",
        escape.to_str().expect("utf-8"),
    ] {
        let mut manifest = original.clone();
        manifest["files"][0]["path"] = serde_json::Value::from(evil);
        std::fs::write(&manifest_path, serde_json::to_vec(&manifest).expect("json"))
            .expect("write");
        let dir = h.path("ckpt");
        write(&dir.join("current.bin"), b"current");
        // Its mode is whatever this process's umask made it.
        let before = tree(&dir);
        let output = h.restore("job", &dir, &[]);
        assert!(!output.status.success(), "{evil} was accepted");
        let err = stderr(&output);
        assert!(err.contains("refusing to restore"), "{evil}: {err}");
        assert!(!escape.exists(), "{evil} escaped");
        assert_eq!(tree(&dir), before);
    }
}

#[test]
fn prune_keeps_every_object_the_kept_generations_need() {
    let h = Harness::new();
    let source = h.path("source");
    write(&source.join("frozen.bin"), &pseudo_random(6 * MIB, 10));
    write(&source.join("weights.bin"), &pseudo_random(MIB, 11));
    write(&source.join("step.json"), b"1");
    let first = committed_generation(&h.upload("job", &source, &[]));

    write(&source.join("weights.bin"), &pseudo_random(MIB, 12));
    write(&source.join("step.json"), b"2");
    let second = committed_generation(&h.upload("job", &source, &[]));
    let second_state = h.path("second-state");
    assert_success(&h.restore("job", &second_state, &[]));

    write(&source.join("step.json"), b"3");
    let third = committed_generation(&h.upload("job", &source, &[]));

    // An upload in progress (newer than the newest manifest) and the leftovers of a failed one
    // (older, never committed).
    let in_progress = format!("{PREFIX}/job/gen/29991231T235959999Z-00000000/weights.bin");
    let abandoned = format!(
        "{PREFIX}/job/gen/{}/weights.bin",
        "20000101T000000000Z-00000000"
    );
    write(&h.object(&in_progress), b"being uploaded");
    write(&h.object(&abandoned), b"abandoned");

    let output = h.sidecar(&h.server.endpoint(), "job", "prune", &["--keep", "2"]);
    assert_success(&output);
    assert_eq!(h.manifests("job"), [second.clone(), third.clone()]);
    // frozen.bin was uploaded by the first generation and is still needed.
    assert!(
        h.object(&format!("{PREFIX}/job/gen/{first}/frozen.bin"))
            .exists()
    );
    // The first generation's weights and step were replaced: nothing needs them.
    assert!(
        !h.object(&format!("{PREFIX}/job/gen/{first}/weights.bin"))
            .exists()
    );
    assert!(
        !h.object(&format!("{PREFIX}/job/gen/{first}/step.json"))
            .exists()
    );
    assert!(
        h.object(&in_progress).exists(),
        "an upload in progress is not touched"
    );
    assert!(!h.object(&abandoned).exists(), "unreferenced leftovers go");

    let restored = h.path("restored-second");
    assert_success(&h.restore("job", &restored, &["--generation", &second]));
    assert_same_tree(&second_state, &restored);
    let restored = h.path("restored-third");
    assert_success(&h.restore("job", &restored, &[]));
    assert_same_tree(&source, &restored);
}

/// `count` small files of 0 to 2,000 bytes in nested directories (one holding only
/// directories); returns their total size.
fn write_many_small_files(dir: &Path, count: usize) -> u64 {
    let mut total = 0;
    for i in 0..count {
        let size = (i * 7919) % 2001;
        let path = dir.join(format!("layer-{:02}/shard/{i:05}.chunk", i % 37));
        write(&path, &pseudo_random(size, i as u64));
        total += size as u64;
    }
    total
}

#[test]
fn ten_thousand_small_files_round_trip_byte_for_byte_and_list_counts_them() {
    const FILES: usize = 10_000;
    let h = Harness::new();
    let source = h.path("source");
    let bytes = write_many_small_files(&source, FILES);
    let generation = committed_generation(&h.upload("many", &source, &[]));

    let restored = h.path("restored");
    assert_success(&h.restore("many", &restored, &[]));
    assert_same_tree(&source, &restored);

    let listed = h.sidecar(&h.server.endpoint(), "many", "list", &["--json"]);
    assert_success(&listed);
    let line: serde_json::Value =
        serde_json::from_str(stdout(&listed).trim()).expect("one JSON line");
    assert_eq!(line["generation"], generation.as_str());
    assert_eq!(line["files"], FILES);
    assert_eq!(line["bytes"], bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_moved_into_a_new_checkpoint_directory_are_reused_by_content_among_many_of_one_size()
{
    let h = Harness::new();
    let source = h.path("source");
    // Many files of one size, each with its own bytes: only the checksums tell them apart.
    for i in 0..300 {
        write(
            &source.join(format!("checkpoint-1/shard-{i:03}.bin")),
            &pseudo_random(4096, 1000 + i),
        );
    }
    let store = h.store(&h.server.endpoint(), "moved").await;
    let upload = |options: UploadOptions| {
        let (store, source) = (store.clone(), source.clone());
        async move {
            nerve_store::upload_generation(&store, &source, &options, &CancellationToken::new())
                .await
                .expect("upload commits")
        }
    };
    upload(UploadOptions::default()).await;
    // The trainer's next checkpoint: the same shards under a new name, one of them changed.
    std::fs::rename(source.join("checkpoint-1"), source.join("checkpoint-2")).expect("rename");
    write(
        &source.join("checkpoint-2/shard-150.bin"),
        &pseudo_random(4096, 7),
    );
    let second = upload(UploadOptions::default()).await;
    assert_eq!(second.files, 300);
    assert_eq!(
        second.bytes_uploaded, 4096,
        "only the changed shard is sent"
    );
    assert_eq!(second.bytes_reused, 299 * 4096);

    let restored = h.path("restored");
    assert_success(&h.restore("moved", &restored, &[]));
    assert_same_tree(&source, &restored);
}

#[test]
fn restoring_a_job_with_nothing_committed_exits_zero_and_says_so() {
    let h = Harness::new();
    let dir = h.path("ckpt");
    let output = h.restore("fresh-job", &dir, &[]);
    assert_success(&output);
    assert!(
        stdout(&output).contains("nothing to restore"),
        "{}",
        stdout(&output)
    );
    assert!(!dir.exists());
}

/// Uploads `source` through `proxy`, whose first `stalls` PUTs of `grows.bin` are held for a
/// while before they reach the server; during each one the file is appended to, as a trainer
/// still writing would.
async fn upload_while_a_file_grows(
    h: &Harness,
    stalls: usize,
    size: usize,
) -> (Result<nerve_store::UploadSummary, UploadError>, Vec<u8>) {
    let proxy = FaultProxy::start(h.server.addr()).expect("proxy");
    proxy.add_rule(
        Rule::new(Fault::Delay(Duration::from_secs(1)))
            .method("PUT")
            .path_contains("grows.bin")
            .times(stalls),
    );
    let source = h.path("source");
    let mut grows = pseudo_random(size, 20);
    write(&source.join("grows.bin"), &grows);
    write(&source.join("other.bin"), &pseudo_random(MIB, 21));
    let store = h.store(&proxy.endpoint(), "job").await;
    let upload = tokio::spawn({
        let (store, source) = (store.clone(), source.clone());
        async move {
            nerve_store::upload_generation(
                &store,
                &source,
                &UploadOptions::default(),
                &CancellationToken::new(),
            )
            .await
        }
    });
    for stall in 1..=stalls {
        let waited = tokio::time::timeout(Duration::from_secs(60), async {
            while proxy.injected().len() < stall {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "the upload never reached stalled request {stall}"
        );
        use std::io::Write;
        let line = format!("the trainer is still writing ({stall})\n");
        std::fs::OpenOptions::new()
            .append(true)
            .open(source.join("grows.bin"))
            .expect("open")
            .write_all(line.as_bytes())
            .expect("append");
        grows.extend_from_slice(line.as_bytes());
    }
    let result = tokio::time::timeout(COMMAND_TIMEOUT, upload)
        .await
        .expect("upload finishes")
        .expect("task");
    (result, grows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_rewritten_during_upload_is_sent_again_and_committed_with_its_new_bytes() {
    let h = Harness::new();
    let (result, grows) = upload_while_a_file_grows(&h, 1, MIB).await;
    let summary = result.expect("the upload retries the file and commits");
    assert_eq!(summary.files, 2);
    assert_eq!(
        restored_grows(&h),
        grows,
        "the generation holds the file as it was after the rewrite"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_file_rewritten_during_its_upload_is_sent_again_with_its_new_bytes() {
    let h = Harness::new();
    // Small enough to be read whole and sent from memory.
    let (result, grows) = upload_while_a_file_grows(&h, 1, 1000).await;
    result.expect("the upload retries the file and commits");
    assert_eq!(
        restored_grows(&h),
        grows,
        "the generation holds the file as it was after the rewrite, not the bytes read first"
    );
}

/// Restores the job's newest generation and returns the bytes of `grows.bin` in it.
fn restored_grows(h: &Harness) -> Vec<u8> {
    let restored = h.path("restored");
    let output = h.sidecar(
        &h.server.endpoint(),
        "job",
        "restore",
        &["--dir", restored.to_str().expect("utf-8")],
    );
    assert!(output.status.success(), "restore: {}", stderr(&output));
    std::fs::read(restored.join("grows.bin")).expect("read")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_keeps_changing_fails_the_generation_and_commits_nothing() {
    let h = Harness::new();
    let (result, _) =
        upload_while_a_file_grows(&h, nerve_store::upload::FILE_ATTEMPTS as usize, MIB).await;
    match result {
        Err(UploadError::FileChanged { path }) => assert_eq!(path, "grows.bin"),
        other => panic!("expected FileChanged, got {other:?}"),
    }
    assert!(h.manifests("job").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_an_upload_aborts_its_multipart_uploads_and_writes_no_manifest() {
    let h = Harness::new();
    let proxy = FaultProxy::start(h.server.addr()).expect("proxy");
    proxy.add_rule(
        Rule::new(Fault::Stall(Duration::from_secs(30)))
            .method("PUT")
            .path_contains("partNumber=2"),
    );
    let source = h.path("source");
    write(&source.join("big.bin"), &pseudo_random(12 * MIB, 30));
    let store = h.store(&proxy.endpoint(), "job").await;
    let cancel = CancellationToken::new();
    let options = UploadOptions {
        part_size: 5 * MIB as u64,
        ..UploadOptions::default()
    };
    let upload = tokio::spawn({
        let (store, source, cancel) = (store.clone(), source.clone(), cancel.clone());
        async move { nerve_store::upload_generation(&store, &source, &options, &cancel).await }
    });
    let waited = tokio::time::timeout(Duration::from_secs(60), async {
        while proxy.injected().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "the upload never reached the stalled part");
    assert_eq!(
        h.server.incomplete_uploads().len(),
        1,
        "the multipart upload is open"
    );
    cancel.cancel();
    let result = tokio::time::timeout(COMMAND_TIMEOUT, upload)
        .await
        .expect("upload stops")
        .expect("task");
    assert!(matches!(result, Err(UploadError::Cancelled)), "{result:?}");
    assert!(h.server.incomplete_uploads().is_empty(), "aborted");
    assert!(h.manifests("job").is_empty());
}

#[test]
fn restore_picks_the_newest_step_not_the_newest_clock() {
    let h = Harness::new();
    let source = h.path("source");
    write(&source.join("weights.bin"), &pseudo_random(MIB, 40));
    let newer_step = committed_generation(&h.upload("job", &source, &["--step", "1055"]));
    let newer_state = h.path("newer-state");
    assert_success(&h.restore("job", &newer_state, &[]));
    // A pod whose clock runs ahead (or an old pod still uploading) commits an older step later.
    write(&source.join("weights.bin"), &pseudo_random(MIB, 41));
    let older_step = committed_generation(&h.upload("job", &source, &["--step", "55"]));
    assert!(older_step > newer_step, "the later upload has the later id");

    let restored = h.path("restored");
    assert_success(&h.restore("job", &restored, &[]));
    assert_same_tree(&newer_state, &restored);
    let listing = stdout(&h.sidecar(&h.server.endpoint(), "job", "list", &["--json"]));
    let steps: Vec<u64> = listing
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["step"]
                .as_u64()
                .expect("step")
        })
        .collect();
    assert_eq!(
        steps,
        [55, 1055],
        "list shows generations oldest step first"
    );
}

#[test]
fn an_upload_of_a_given_step_leaves_out_the_newer_step_checkpoint_being_written() {
    let h = Harness::new();
    let source = h.path("source");
    write(
        &source.join("checkpoint-5/model.safetensors"),
        b"weights of step 5",
    );
    write(
        &source.join("checkpoint-5/trainer_state.json"),
        br#"{"global_step": 5}"#,
    );
    write(
        &source.join("checkpoint-6/model.safetensors"),
        b"the first half of",
    );
    write(&source.join("config.json"), b"{}");
    let output = h.upload("job", &source, &["--step", "5"]);
    let generation = committed_generation(&output);
    assert!(
        stdout(&output).contains("left out checkpoint-6 (newer than step 5)"),
        "{}",
        stdout(&output)
    );
    assert!(
        stderr(&output).contains("left out checkpoint-6/: newer than step 5"),
        "{}",
        stderr(&output)
    );
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(h.manifest_path("job", &generation)).expect("manifest"),
    )
    .expect("json");
    assert_eq!(manifest["step"], 5);

    let restored = h.path("restored");
    assert_success(&h.restore("job", &restored, &[]));
    std::fs::remove_dir_all(source.join("checkpoint-6")).expect("rm");
    assert_same_tree(&source, &restored);
}

#[test]
fn an_upload_without_a_step_is_not_held_back_by_a_done_marker_left_from_an_older_save() {
    let h = Harness::new();
    let source = h.path("source");
    for step in [5u64, 1055] {
        write(
            &source.join(format!("checkpoint-{step}/model.safetensors")),
            format!("weights of step {step}").as_bytes(),
        );
        write(
            &source.join(format!("checkpoint-{step}/trainer_state.json")),
            format!(r#"{{"global_step": {step}}}"#).as_bytes(),
        );
    }
    // Written for a notice save at step 5; the trainer saved on to 1055 without marking again.
    write(&source.join(".nerve-done"), b"step=5\nreason=notice\n");
    let output = h.upload("job", &source, &[]);
    let generation = committed_generation(&output);
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(h.manifest_path("job", &generation)).expect("manifest"),
    )
    .expect("json");
    assert_eq!(manifest["step"], 1055, "{}", stderr(&output));
    assert!(
        nerve_tests::pod::manifest_paths(&manifest)
            .contains(&"checkpoint-1055/model.safetensors".to_owned()),
        "the newest checkpoint was left out as newer than the stale marker's step: {manifest}"
    );
}

/// `data` with its last four bytes changed so that its CRC32C is `target`. A CRC is affine in
/// the data over GF(2), and four free bytes reach every 32-bit value: solve for them.
fn forge_crc32c(mut data: Vec<u8>, target: u32) -> Vec<u8> {
    let n = data.len();
    data[n - 4..].fill(0);
    let zeros = crc32c::crc32c(&vec![0u8; n]);
    let needed = crc32c::crc32c(&data) ^ target;
    // Row i: which window bits flip result bit i, and (bit 32) whether bit i must flip.
    let mut rows = [0u64; 32];
    for bit in 0..32 {
        let mut unit = vec![0u8; n];
        unit[n - 4 + bit / 8] = 1 << (bit % 8);
        let effect = crc32c::crc32c(&unit) ^ zeros;
        for (i, row) in rows.iter_mut().enumerate() {
            *row |= u64::from((effect >> i) & 1) << bit;
        }
    }
    for (i, row) in rows.iter_mut().enumerate() {
        *row |= u64::from((needed >> i) & 1) << 32;
    }
    for column in 0..32 {
        let pivot = (column..32)
            .find(|&r| rows[r] >> column & 1 == 1)
            .expect("invertible");
        rows.swap(column, pivot);
        for r in 0..32 {
            if r != column && rows[r] >> column & 1 == 1 {
                rows[r] ^= rows[column];
            }
        }
    }
    for (bit, row) in rows.iter().enumerate() {
        if row >> 32 & 1 == 1 {
            data[n - 4 + bit / 8] |= 1 << (bit % 8);
        }
    }
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_whose_crc32c_matches_an_earlier_one_is_uploaded_not_reused() {
    let h = Harness::new();
    let source = h.path("source");
    let earlier = pseudo_random(MIB, 50);
    write(&source.join("shard.bin"), &earlier);
    let store = h.store(&h.server.endpoint(), "job").await;
    let cancel = CancellationToken::new();
    nerve_store::upload_generation(&store, &source, &UploadOptions::default(), &cancel)
        .await
        .expect("first upload");
    // Same path, same size, same CRC32C, different bytes: one shard among many of a sharded
    // optimizer state is a 1-in-4-billion coincidence per pair.
    let later = forge_crc32c(pseudo_random(MIB, 51), crc32c::crc32c(&earlier));
    assert_eq!(crc32c::crc32c(&later), crc32c::crc32c(&earlier));
    assert_ne!(later, earlier);
    write(&source.join("shard.bin"), &later);
    let second =
        nerve_store::upload_generation(&store, &source, &UploadOptions::default(), &cancel)
            .await
            .expect("second upload");
    assert_eq!(second.bytes_reused, 0, "reused an object with other bytes");
    assert_eq!(second.bytes_uploaded, MIB as u64);
    let restored = h.path("restored");
    assert_success(&h.restore("job", &restored, &[]));
    assert_eq!(
        std::fs::read(restored.join("shard.bin")).expect("read"),
        later
    );
}

#[test]
fn restore_never_restores_setuid_bits_and_gives_root_restored_files_to_the_directory_owner() {
    use std::os::unix::fs::MetadataExt;
    let h = Harness::new();
    let (_, manifest_path, mut manifest) = h.committed_manifest("job");
    // A bucket writer plants a setuid, setgid, sticky file.
    manifest["files"][0]["mode"] = serde_json::json!(0o7755);
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).expect("json")).expect("write");
    let path = manifest["files"][0]["path"]
        .as_str()
        .expect("path")
        .to_owned();
    let dir = h.path("owned");
    std::fs::create_dir(&dir).expect("mkdir");
    let running_as_root = nix::unistd::geteuid().is_root();
    if running_as_root {
        std::os::unix::fs::chown(&dir, Some(1000), Some(1000)).expect("chown");
    }
    assert_success(&h.restore("job", &dir, &[]));
    let meta = std::fs::metadata(dir.join(&path)).expect("restored");
    assert_eq!(meta.mode() & 0o7777, 0o755, "special bits were restored");
    if running_as_root {
        let owners: Vec<(u32, u32)> = tree(&dir)
            .iter()
            .map(|(p, _, _)| {
                let m = std::fs::metadata(dir.join(p)).expect("meta");
                (m.uid(), m.gid())
            })
            .collect();
        assert!(owners.iter().all(|o| *o == (1000, 1000)), "{owners:?}");
        let top = std::fs::metadata(&dir).expect("dir");
        assert_eq!((top.uid(), top.gid()), (1000, 1000));
    } else {
        eprintln!("SKIPPED the ownership half: not running as root");
    }
}
