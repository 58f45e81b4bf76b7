//! Fault injection for "zero loss": the real `nerve-sidecar` binary against the in-process S3
//! server, through the fault-injecting proxy, killed with SIGKILL at seeded random points,
//! restoring into a full disk, and fed hostile manifests and flags.
//!
//! Every scenario ends in the same check: whatever happened, `restore` yields byte for byte
//! either the previous generation or the new one, every committed manifest names only objects
//! that exist with the size and CRC32C it lists, and no multipart upload is left open (or, after
//! a SIGKILL, `prune` cleans up what was left). The scenario matrix with measured trials is in
//! `docs/faults.md`; the longer soak is `bench/soak`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nerve_tests::fault_proxy::{Fault, FaultProxy, Rule};
use nerve_tests::process::{COMMAND_TIMEOUT, run_bounded, wait_bounded};
use nerve_tests::s3::S3Server;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::{Value, json};

const BUCKET: &str = "faults";
const PREFIX: &str = "ckpt";
/// SIGKILL trials in CI; `bench/soak` runs many more (`NERVE_CRASH_TRIALS`).
const CRASH_TRIALS: usize = 50;
/// Seed of the crash trials unless `NERVE_CRASH_SEED` says otherwise (printed on failure).
const CRASH_SEED: u64 = 0x6e65_7276_6507;
const MIB: usize = 1024 * 1024;

/// The store side of one test: an S3 server on a root and port that survive restarts.
struct World {
    s3: Option<S3Server>,
    root: tempfile::TempDir,
    addr: SocketAddr,
    work: tempfile::TempDir,
    job: String,
}

impl World {
    fn new(job: &str) -> World {
        let root = tempfile::Builder::new()
            .prefix("nerve-faults-s3-")
            .tempdir()
            .expect("s3 root");
        let s3 = S3Server::start_at(root.path(), SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("S3 server");
        s3.create_bucket(BUCKET).expect("bucket");
        let addr = s3.addr();
        World {
            s3: Some(s3),
            root,
            addr,
            work: tempfile::Builder::new()
                .prefix("nerve-faults-")
                .tempdir()
                .expect("work dir"),
            job: job.to_owned(),
        }
    }

    fn s3(&self) -> &S3Server {
        self.s3.as_ref().expect("the S3 server is running")
    }

    fn stop_s3(&mut self) {
        self.s3 = None;
    }

    fn start_s3(&mut self) {
        // The port was just released; a moment of retry covers a slow close.
        let started = Instant::now();
        loop {
            match S3Server::start_at(self.root.path(), self.addr) {
                Ok(s3) => {
                    self.s3 = Some(s3);
                    return;
                }
                Err(err) if started.elapsed() < Duration::from_secs(10) => {
                    eprintln!("restarting S3 on {}: {err}; retrying", self.addr);
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(err) => panic!("restarting S3 on {}: {err}", self.addr),
            }
        }
    }

    fn dir(&self, name: &str) -> PathBuf {
        let dir = self.work.path().join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    /// `nerve-sidecar <subcommand> --dest … --job …` talking to `endpoint`.
    fn sidecar(&self, endpoint: &str, subcommand: &str) -> Command {
        let mut command = Command::new(nerve_tests::binary_path("nerve-sidecar"));
        command
            .arg(subcommand)
            .args(["--dest", &format!("s3://{BUCKET}/{PREFIX}")])
            .args(["--job", &self.job, "--path-style"])
            .envs(self.s3().client_env())
            .env("AWS_ENDPOINT_URL", endpoint)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        command
    }

    fn upload(&self, endpoint: &str, dir: &Path) -> Output {
        run_bounded(
            self.sidecar(endpoint, "upload")
                .arg("--dir")
                .arg(dir)
                .args(["--part-size", "5MiB", "--concurrency", "4"]),
        )
    }

    /// Restores the newest generation straight from the server (no faults) into `dir`.
    fn restore(&self, dir: &Path) -> Output {
        run_bounded(
            self.sidecar(&self.s3().endpoint(), "restore")
                .arg("--dir")
                .arg(dir),
        )
    }

    fn gen_dir(&self) -> PathBuf {
        self.root
            .path()
            .join(BUCKET)
            .join(PREFIX)
            .join(&self.job)
            .join("gen")
    }

    /// Committed generations (their manifests exist), oldest first.
    fn committed(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.gen_dir())
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter_map(|n| n.strip_suffix(".manifest.json").map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Every committed manifest names only objects that exist with its size and CRC32C.
    fn assert_manifests_name_whole_objects(&self) {
        for generation in self.committed() {
            let path = self.gen_dir().join(format!("{generation}.manifest.json"));
            let manifest: Value =
                serde_json::from_slice(&std::fs::read(&path).expect("manifest")).expect("json");
            for file in manifest["files"].as_array().expect("files") {
                let key = file["key"].as_str().expect("key");
                let object = self.root.path().join(BUCKET).join(key);
                let bytes = std::fs::read(&object).unwrap_or_else(|e| {
                    panic!("generation {generation} names {key}, which is missing: {e}")
                });
                assert_eq!(
                    bytes.len() as u64,
                    file["size"].as_u64().expect("size"),
                    "generation {generation} names {key} with a size it does not have"
                );
                assert_eq!(
                    format!("{:08x}", crc32c::crc32c(&bytes)),
                    file["crc32c"].as_str().expect("crc"),
                    "generation {generation} names {key} with bytes it does not have"
                );
            }
        }
    }

    /// Multipart uploads the store still holds open: s3s-fs keeps one `.upload-<id>.json` per
    /// upload in its root, which (unlike `S3Server::incomplete_uploads`) survives a restart.
    fn open_multipart_uploads(&self) -> Vec<String> {
        std::fs::read_dir(self.root.path())
            .expect("s3 root")
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with(".upload-") && n.ends_with(".json"))
            .collect()
    }

    /// Restores the newest generation into `into` and returns its files.
    fn restored_tree(&self, into: &Path) -> BTreeMap<String, Vec<u8>> {
        let output = self.restore(into);
        assert!(
            output.status.success(),
            "restore failed: {}",
            stderr(&output)
        );
        read_tree(into)
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Writes a checkpoint: a multipart-sized weights file whose content depends on `seed`, a small
/// file that never changes (reused across generations), and a step file.
fn write_checkpoint(dir: &Path, seed: u64, weights: usize) -> BTreeMap<String, Vec<u8>> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("optim")).expect("mkdir");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut model = vec![0u8; weights];
    rng.fill_bytes(&mut model);
    let mut frozen = vec![0u8; 64 * 1024];
    rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut frozen);
    let mut state = vec![0u8; 200 * 1024 + rng.random_range(0..4096)];
    rng.fill_bytes(&mut state);
    let files = [
        ("model.bin", model),
        ("frozen.bin", frozen),
        ("optim/state.bin", state),
        ("step.json", format!("{{\"seed\":{seed}}}").into_bytes()),
    ];
    for (path, bytes) in &files {
        std::fs::write(dir.join(path), bytes).expect("write checkpoint file");
    }
    files.into_iter().map(|(p, b)| (p.to_owned(), b)).collect()
}

/// Every regular file under `dir`, by relative path.
fn read_tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir)
            .expect("read dir")
            .filter_map(Result::ok)
        {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let relative = path.strip_prefix(root).expect("under root");
                out.insert(
                    relative.to_string_lossy().into_owned(),
                    std::fs::read(&path).expect("read"),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Names of the entries directly in `dir`.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// One S3 fault scenario: commit `before`, upload `after` through the proxy with `rules`, and
/// check the outcome is whole. Returns whether the new generation committed.
fn upload_through_faults(
    world: &mut World,
    rules: &[Rule],
    during: impl FnOnce(&mut World, &FaultProxy),
) -> bool {
    let dir = world.dir("checkpoint");
    let before = write_checkpoint(&dir, 1, 11 * MIB);
    let output = world.upload(&world.s3().endpoint(), &dir);
    assert!(output.status.success(), "clean upload: {}", stderr(&output));
    let after = write_checkpoint(&dir, 2, 11 * MIB);

    let proxy = FaultProxy::start(world.addr).expect("proxy");
    for rule in rules {
        proxy.add_rule(rule.clone());
    }
    let endpoint = proxy.endpoint();
    let mut command = world.sidecar(&endpoint, "upload");
    command
        .arg("--dir")
        .arg(&dir)
        .args(["--part-size", "5MiB", "--concurrency", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = command.spawn().expect("spawn upload");
    during(world, &proxy);
    let output = wait_bounded(child, "upload through the fault proxy");
    let committed = output.status.success();
    eprintln!(
        "faults injected: {:?}\nupload {}: {}",
        proxy.injected(),
        if committed { "committed" } else { "failed" },
        stderr(&output)
    );
    assert!(
        !proxy.injected().is_empty(),
        "the scenario must actually inject a fault"
    );
    drop(proxy);

    world.assert_manifests_name_whole_objects();
    assert_eq!(world.committed().len(), if committed { 2 } else { 1 });
    let restored = world.restored_tree(&world.dir("restored"));
    let expected = if committed { &after } else { &before };
    assert!(
        &restored == expected,
        "restore gave neither exactly the new generation nor exactly the previous one"
    );
    assert_eq!(
        world.open_multipart_uploads(),
        Vec::<String>::new(),
        "multipart uploads left open"
    );
    committed
}

#[test]
fn slowdown_and_internal_error_bursts_are_ridden_out_and_the_new_generation_commits() {
    let mut world = World::new("slowdown");
    let rules = [
        Rule::new(Fault::SlowDown)
            .method("PUT")
            .path_contains("partNumber=")
            .times(6),
        Rule::new(Fault::InternalError).method("PUT").times(4),
        Rule::new(Fault::SlowDown)
            .method("POST")
            .path_contains("uploads")
            .times(2),
    ];
    assert!(upload_through_faults(&mut world, &rules, |_, _| {}));
}

#[test]
fn connections_reset_mid_part_are_retried_and_the_new_generation_commits() {
    let mut world = World::new("reset");
    let rules = [Rule::new(Fault::ResetMidBody)
        .method("PUT")
        .path_contains("partNumber=")
        .times(4)];
    assert!(upload_through_faults(&mut world, &rules, |_, _| {}));
}

#[test]
fn a_part_corrupted_in_flight_is_refused_by_the_store_and_sent_again() {
    let mut world = World::new("corrupt");
    let rules = [Rule::new(Fault::Corrupt)
        .method("PUT")
        .path_contains("partNumber=2")
        .times(1)];
    assert!(upload_through_faults(&mut world, &rules, |_, _| {}));
}

#[test]
fn a_stalled_response_is_abandoned_and_the_upload_still_finishes() {
    let mut world = World::new("stall");
    // Far longer than the test's bound: only a client-side timeout gets past it.
    let rules = [Rule::new(Fault::Stall(Duration::from_secs(3600)))
        .method("PUT")
        .path_contains("partNumber=1")
        .times(1)];
    assert!(upload_through_faults(&mut world, &rules, |_, _| {}));
}

#[test]
fn a_stalled_answer_to_the_commit_is_abandoned_and_the_upload_finishes() {
    let mut world = World::new("stall-commit");
    // A small body fits in the socket buffers: the client has sent everything and waits for an
    // answer that never comes. Only a timeout on the answer gets past it (this hung forever
    // before the sidecar had one).
    let rules = [Rule::new(Fault::Stall(Duration::from_secs(3600)))
        .method("PUT")
        .path_contains(".manifest.json")
        .times(1)];
    assert!(upload_through_faults(&mut world, &rules, |_, _| {}));
}

#[test]
fn a_multipart_upload_completed_but_whose_answer_was_lost_still_commits() {
    let mut world = World::new("lost-complete");
    // The store completes the upload and the answer never arrives: asked again, the store
    // knows no such upload any more, because the first request worked.
    let rules = [Rule::new(Fault::DropResponse)
        .method("POST")
        .path_contains("uploadId=")
        .times(1)];
    assert!(upload_through_faults(&mut world, &rules, |_, _| {}));
}

#[test]
fn a_commit_whose_answer_was_lost_is_retried_and_the_upload_succeeds() {
    let mut world = World::new("lost-commit");
    let rules = [Rule::new(Fault::DropResponse)
        .method("PUT")
        .path_contains(".manifest.json")
        .times(1)];
    assert!(upload_through_faults(&mut world, &rules, |_, _| {}));
}

#[test]
fn a_store_restarted_mid_upload_ends_in_the_new_or_the_previous_generation_never_a_mix() {
    let mut world = World::new("restart");
    // Hold the second part for a moment so the restart lands while the upload is in flight.
    let rules = [Rule::new(Fault::Stall(Duration::from_secs(2)))
        .method("PUT")
        .path_contains("partNumber=2")
        .times(1)];
    upload_through_faults(&mut world, &rules, |world, proxy| {
        let started = Instant::now();
        while proxy.injected().is_empty() && started.elapsed() < COMMAND_TIMEOUT {
            std::thread::sleep(Duration::from_millis(10));
        }
        world.stop_s3();
        std::thread::sleep(Duration::from_secs(1));
        world.start_s3();
    });
}

/// Waits up to `limit` for the child, killing it with SIGKILL at `kill_after`. Returns whether
/// it exited on its own.
fn kill_at(command: &mut Command, kill_after: Duration) -> bool {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let started = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return true;
        }
        if started.elapsed() >= kill_after {
            let _ = child.kill(); // SIGKILL: no handler runs, nothing is aborted.
            let _ = child.wait();
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn sigkill_anywhere_in_an_upload_leaves_a_whole_generation_and_prune_cleans_up_the_rest() {
    let trials = std::env::var("NERVE_CRASH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CRASH_TRIALS);
    let seed = std::env::var("NERVE_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CRASH_SEED);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let world = World::new("crash");
    let endpoint = world.s3().endpoint();
    let dir = world.dir("checkpoint");
    let restored = world.dir("restored");

    // Calibrate: kill points spread over one whole upload (with a previous generation, as in
    // the trials) on this machine: the median of three, plus a tenth to reach past the commit.
    let mut content = BTreeMap::new();
    let mut durations = Vec::new();
    for seed in 0..3 {
        content = write_checkpoint(&dir, seed, 6 * MIB);
        let started = Instant::now();
        let output = world.upload(&endpoint, &dir);
        assert!(output.status.success(), "clean upload: {}", stderr(&output));
        durations.push(started.elapsed());
    }
    durations.sort();
    let window = durations[1].mul_f64(1.1);

    let (mut killed, mut new_generation) = (0, 0);
    for trial in 0..trials {
        let context = format!("trial {trial} (NERVE_CRASH_SEED={seed})");
        let previous = content;
        content = write_checkpoint(&dir, 1000 + trial as u64, 6 * MIB);
        let committed_before = world.committed();
        let kill_after = window.mul_f64(rng.random::<f64>());
        let mut upload = world.sidecar(&endpoint, "upload");
        upload
            .arg("--dir")
            .arg(&dir)
            .args(["--part-size", "5MiB", "--concurrency", "4"]);
        let was_killed = !kill_at(&mut upload, kill_after);
        killed += usize::from(was_killed);
        let committed = world.committed();
        let got = world.restored_tree(&restored);
        if committed == committed_before {
            assert!(
                was_killed,
                "{context}: an upload that exited committed nothing"
            );
            assert!(
                got == previous,
                "{context}: restore is not the previous generation"
            );
        } else {
            new_generation += usize::from(was_killed);
            assert_eq!(committed.len(), committed_before.len() + 1, "{context}");
            assert!(
                got == content,
                "{context}: restore is not the new generation"
            );
        }
        // A re-run completes and commits exactly this content.
        let output = world.upload(&endpoint, &dir);
        assert!(
            output.status.success(),
            "{context}: re-run: {}",
            stderr(&output)
        );
        assert!(
            world.restored_tree(&restored) == content,
            "{context}: re-run content"
        );
    }
    world.assert_manifests_name_whole_objects();
    eprintln!(
        "{trials} trials (seed {seed}, window {window:?}): {killed} killed mid-upload, \
         {new_generation} of those committed before the kill landed; \
         {} multipart uploads left open by SIGKILL (prune aborts them)",
        world.open_multipart_uploads().len()
    );
    assert!(
        killed >= trials / 4,
        "too few kills landed inside the upload"
    );

    // What SIGKILL leaves behind (objects of uncommitted generations, open multipart uploads)
    // is what `prune` removes: afterwards only what the kept generation names is stored.
    let output = run_bounded(world.sidecar(&endpoint, "prune").args(["--keep", "1"]));
    assert!(output.status.success(), "prune: {}", stderr(&output));
    let newest = world.committed().pop().expect("a committed generation");
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(world.gen_dir().join(format!("{newest}.manifest.json"))).expect("read"),
    )
    .expect("json");
    let mut named: Vec<String> = manifest["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|f| f["key"].as_str().expect("key").to_owned())
        .collect();
    named.push(format!("{PREFIX}/{}/gen/{newest}.manifest.json", world.job));
    named.sort();
    let bucket = world.root.path().join(BUCKET);
    let mut stored: Vec<String> = read_tree(&world.gen_dir())
        .into_keys()
        .map(|k| format!("{PREFIX}/{}/gen/{k}", world.job))
        .collect();
    stored.sort();
    assert_eq!(stored, named, "prune left objects no generation names");
    assert!(bucket.exists());
    assert_eq!(
        world.open_multipart_uploads(),
        Vec::<String>::new(),
        "multipart uploads left open after prune"
    );
    assert!(world.restored_tree(&restored) == content);
}

/// Whether this machine lets an unprivileged user namespace mount a tmpfs.
fn can_mount_tmpfs() -> bool {
    Command::new("unshare")
        .args(["-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn restore_onto_a_full_disk_fails_clearly_and_leaves_the_directory_and_no_staging() {
    let world = World::new("disk");
    let dir = world.dir("checkpoint");
    write_checkpoint(&dir, 3, 11 * MIB);
    let output = world.upload(&world.s3().endpoint(), &dir);
    assert!(output.status.success(), "upload: {}", stderr(&output));

    let sidecar = nerve_tests::binary_path("nerve-sidecar");
    let mount = world.dir("small-disk");
    let env: Vec<String> = world
        .s3()
        .client_env()
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let restore = format!(
        "env {} RUST_LOG=warn {} restore --dir \"$M/ckpt\" --dest s3://{BUCKET}/{PREFIX} --job {} --path-style",
        env.join(" "),
        sidecar.display(),
        world.job
    );
    // The target: the previous checkpoint in $M/ckpt on a filesystem too small for the new one.
    let script = format!(
        "set -u; M={mount}; {setup}; mkdir \"$M/ckpt\"; \
         printf 'previous checkpoint' > \"$M/ckpt/old.bin\"; \
         {restore}; echo \"exit=$?\"; \
         echo \"entries=$(ls -A \"$M\" | tr '\\n' ' ')\"; \
         echo \"dir=$(ls -A \"$M/ckpt\" | tr '\\n' ' ')\"; \
         echo \"old=$(cat \"$M/ckpt/old.bin\")\"",
        mount = mount.display(),
        setup = if can_mount_tmpfs() {
            "mount -t tmpfs -o size=4m tmpfs \"$M\""
        } else {
            // No namespaces here: a file-size limit, with SIGXFSZ ignored so writes fail with
            // EFBIG instead of killing the process.
            eprintln!("unshare/mount unavailable: using RLIMIT_FSIZE instead of a small tmpfs");
            "trap '' XFSZ; ulimit -f 4096"
        },
    );
    let shell = if can_mount_tmpfs() {
        vec!["unshare", "-rm", "sh", "-c"]
    } else {
        vec!["sh", "-c"]
    };
    let output = run_bounded(Command::new(shell[0]).args(&shell[1..]).arg(&script));
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    let errors = stderr(&output);
    eprintln!("{report}\n{errors}");
    assert!(!report.contains("exit=0"), "restore must fail: {report}");
    assert!(
        report.contains("exit=1"),
        "a runtime error, not a crash: {report}"
    );
    if can_mount_tmpfs() {
        // statvfs shows the 4 MiB filesystem too small: refused before any byte is fetched.
        assert!(
            errors.contains("MiB free on its filesystem") && errors.contains("needs 11.3 MiB"),
            "the error says the disk is too small, and by how much: {errors}"
        );
    } else {
        // statvfs sees the real disk; the file-size limit strikes while writing.
        assert!(
            errors.contains("File too large") && errors.contains("writing"),
            "the error says what could not be written: {errors}"
        );
    }
    assert!(
        report.contains("entries=ckpt \n"),
        "staging cleaned up: {report}"
    );
    assert!(
        report.contains("dir=old.bin \n"),
        "--dir untouched: {report}"
    );
    assert!(
        report.contains("old=previous checkpoint"),
        "--dir untouched: {report}"
    );
}

/// Stores `manifest` (and `objects`) as committed generation `generation` of `world`'s job,
/// straight into the server's directory, as a hostile or broken writer could.
fn plant_generation(world: &World, generation: &str, manifest: &Value, objects: &[(&str, &[u8])]) {
    let gen_dir = world.gen_dir();
    std::fs::create_dir_all(&gen_dir).expect("mkdir");
    for (key, bytes) in objects {
        let path = world.root.path().join(BUCKET).join(key);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, bytes).expect("write object");
    }
    std::fs::write(
        gen_dir.join(format!("{generation}.manifest.json")),
        serde_json::to_vec(manifest).expect("json"),
    )
    .expect("write manifest");
}

fn manifest_of(world: &World, generation: &str, files: Vec<Value>) -> Value {
    json!({"version": 1, "generation": generation, "job": world.job,
           "created_at": "2026-11-24T02:00:00Z", "files": files})
}

fn entry(world: &World, generation: &str, path: &str, bytes: &[u8]) -> Value {
    json!({"path": path, "size": bytes.len(), "mode": 0o644,
           "crc32c": format!("{:08x}", crc32c::crc32c(bytes)),
           "key": format!("{PREFIX}/{}/gen/{generation}/{path}", world.job)})
}

#[test]
fn hostile_manifests_are_refused_with_the_reason_and_nothing_on_disk_changes() {
    let world = World::new("hostile");
    let dir = world.dir("checkpoint");
    let previous = write_checkpoint(&dir, 4, 64 * 1024);
    let bytes: &[u8] = b"payload";
    let mut generation_number = 0;
    let mut next_generation = || {
        generation_number += 1;
        format!("20261124T020000000Z-{generation_number:08x}")
    };
    type Case = (
        &'static str,
        Box<dyn Fn(&World, &str) -> Value>,
        &'static str,
    );
    let key_for = |world: &World, generation: &str, path: &str| {
        format!("{PREFIX}/{}/gen/{generation}/{path}", world.job)
    };
    let cases: Vec<Case> = vec![
        (
            "dot-dot path",
            Box::new(|w, g| manifest_of(w, g, vec![entry(w, g, "../escaped.bin", b"payload")])),
            "climbs out with `..`",
        ),
        (
            "absolute path",
            Box::new(|w, g| {
                manifest_of(
                    w,
                    g,
                    vec![entry(w, g, "/tmp/nerve-absolute.bin", b"payload")],
                )
            }),
            "is absolute",
        ),
        (
            "duplicated path",
            Box::new(|w, g| {
                manifest_of(
                    w,
                    g,
                    vec![
                        entry(w, g, "a.bin", b"payload"),
                        entry(w, g, "a.bin", b"payload"),
                    ],
                )
            }),
            "twice",
        ),
        (
            "file and directory",
            Box::new(|w, g| {
                manifest_of(
                    w,
                    g,
                    vec![entry(w, g, "a", b"payload"), entry(w, g, "a/b", b"payload")],
                )
            }),
            "both a file and a directory",
        ),
        (
            "key of another job",
            Box::new(|w, g| {
                let mut e = entry(w, g, "a.bin", b"payload");
                e["key"] = json!(format!("{PREFIX}/other-job/gen/{g}/a.bin"));
                manifest_of(w, g, vec![e])
            }),
            "outside this job's prefix",
        ),
        (
            "size that lies",
            Box::new(|w, g| {
                let mut e = entry(w, g, "a.bin", b"payload");
                e["size"] = json!(7 * 1024 * 1024);
                manifest_of(w, g, vec![e])
            }),
            "does not have the",
        ),
        (
            "checksum that lies",
            Box::new(|w, g| {
                let mut e = entry(w, g, "a.bin", b"payload");
                e["crc32c"] = json!("00000000");
                manifest_of(w, g, vec![e])
            }),
            "CRC32C",
        ),
        (
            "wrong types",
            Box::new(|w, g| {
                let mut e = entry(w, g, "a.bin", b"payload");
                e["size"] = json!("seven");
                manifest_of(w, g, vec![e])
            }),
            "not valid manifest JSON",
        ),
        (
            "restore's own reserved name",
            Box::new(|w, g| {
                let name = ".nerve-old-20261124T020000000Z-00000001/a.bin";
                manifest_of(w, g, vec![entry(w, g, name, b"payload")])
            }),
            "reserves for restore's own files",
        ),
        (
            "link out of the directory",
            Box::new(|w, g| {
                let mut link = entry(w, g, "etc", b"");
                link["link"] = json!("../../../etc");
                link["key"] = json!("");
                manifest_of(w, g, vec![link])
            }),
            "outside the checkpoint directory",
        ),
        (
            "file written through a link",
            Box::new(|w, g| {
                let mut link = entry(w, g, "sub", b"");
                link["link"] = json!(".");
                link["key"] = json!("");
                manifest_of(w, g, vec![link, entry(w, g, "sub/a.bin", b"payload")])
            }),
            "lies below a symbolic link",
        ),
        (
            "newer format",
            Box::new(|w, g| {
                let mut m = manifest_of(w, g, vec![entry(w, g, "a.bin", b"payload")]);
                m["version"] = json!(99);
                m
            }),
            "upgrade nerve-sidecar",
        ),
        (
            "huge file count",
            Box::new(|w, g| {
                // 100,000 entries, all naming objects that do not exist.
                let files = (0..100_000)
                    .map(|i| entry(w, g, &format!("shard-{i:06}.bin"), b"payload"))
                    .collect();
                manifest_of(w, g, files)
            }),
            "NoSuchKey",
        ),
    ];
    for (name, manifest, reason) in cases {
        let generation = next_generation();
        let manifest = manifest(&world, &generation);
        plant_generation(
            &world,
            &generation,
            &manifest,
            &[
                (&key_for(&world, &generation, "a.bin"), bytes),
                (&key_for(&world, &generation, "a"), bytes),
            ],
        );
        let started = Instant::now();
        let output = world.restore(&dir);
        assert!(!output.status.success(), "{name}: restore must refuse it");
        assert_ne!(
            output.status.code(),
            Some(64),
            "{name}: not a configuration error"
        );
        let errors = stderr(&output);
        assert!(
            errors.contains(reason),
            "{name}: the error names the problem ({reason}): {errors}"
        );
        assert!(read_tree(&dir) == previous, "{name}: --dir changed");
        assert_eq!(
            entries(world.work.path()),
            ["checkpoint"],
            "{name}: staging left behind"
        );
        assert!(!world.work.path().join("escaped.bin").exists());
        assert!(!Path::new("/tmp/nerve-absolute.bin").exists());
        eprintln!(
            "{name}: refused in {:?}: {}",
            started.elapsed(),
            errors.lines().last().unwrap_or_default()
        );
        // Out of the way, so the next case is the newest generation.
        std::fs::remove_file(world.gen_dir().join(format!("{generation}.manifest.json")))
            .expect("rm");
    }
}

#[test]
fn links_inside_the_checkpoint_stay_links_and_links_out_of_it_never_reach_the_store() {
    use std::os::unix::fs::symlink;
    let world = World::new("symlink");
    let dir = world.dir("checkpoint");
    let content = write_checkpoint(&dir, 5, 64 * 1024);
    let outside = world.dir("outside");
    let secret = b"the bytes of a file outside the checkpoint";
    std::fs::write(outside.join("secret"), secret).expect("write");
    // `ln -s /some/secret ckpt/x`, a link to a directory outside, a dangling one.
    symlink(outside.join("secret"), dir.join("x")).expect("symlink");
    symlink(&outside, dir.join("outside-dir")).expect("symlink");
    symlink(outside.join("missing.bin"), dir.join("dangling.bin")).expect("symlink");
    // Links within the checkpoint: relative to a file, absolute to a directory.
    symlink("model.bin", dir.join("last.bin")).expect("symlink");
    symlink(dir.join("optim"), dir.join("optim-latest")).expect("symlink");
    let output = world.upload(&world.s3().endpoint(), &dir);
    assert!(output.status.success(), "upload: {}", stderr(&output));

    let stored = read_tree(&world.gen_dir());
    assert!(
        stored
            .values()
            .all(|bytes| !bytes.windows(secret.len()).any(|w| w == secret)),
        "the target of a link out of the checkpoint reached the store"
    );
    let restored = world.dir("restored");
    let output = world.restore(&restored);
    assert!(output.status.success(), "restore: {}", stderr(&output));
    for (path, bytes) in &content {
        let at = restored.join(path);
        assert!(!at.is_symlink(), "{path}");
        assert_eq!(&std::fs::read(&at).expect("read"), bytes, "{path}");
    }
    assert_eq!(
        std::fs::read_link(restored.join("last.bin")).expect("a link"),
        Path::new("model.bin")
    );
    assert_eq!(
        std::fs::read_link(restored.join("optim-latest")).expect("a link"),
        Path::new("optim"),
        "an absolute link inside the checkpoint is restored relative, so it points into --dir"
    );
    for skipped in ["x", "outside-dir", "dangling.bin"] {
        assert!(
            std::fs::symlink_metadata(restored.join(skipped)).is_err(),
            "{skipped} was restored"
        );
    }
}

#[test]
fn prune_and_list_stop_on_sigterm_while_the_store_never_answers() {
    let world = World::new("stalled-prune");
    let dir = world.dir("checkpoint");
    write_checkpoint(&dir, 1, MIB);
    let output = world.upload(&world.s3().endpoint(), &dir);
    assert!(output.status.success(), "upload: {}", stderr(&output));
    for subcommand in [&["prune", "--keep", "1"][..], &["list"][..]] {
        let proxy = FaultProxy::start(world.addr).expect("proxy");
        // Every listing hangs far longer than the test: only the signal ends the command.
        proxy.add_rule(Rule::new(Fault::Stall(Duration::from_secs(3600))).method("GET"));
        let mut command = world.sidecar(&proxy.endpoint(), subcommand[0]);
        command
            .args(&subcommand[1..])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = command.spawn().expect("spawn");
        let started = Instant::now();
        while proxy.injected().is_empty() && started.elapsed() < COMMAND_TIMEOUT {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            !proxy.injected().is_empty(),
            "{subcommand:?} never reached the store"
        );
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let signalled = Instant::now();
        let output = wait_bounded(child, "a command stopped by SIGTERM");
        // One signal is enough; the second-signal escape hatch is for a stuck process.
        assert!(
            signalled.elapsed() < Duration::from_secs(5),
            "{subcommand:?} took {:?} to stop after SIGTERM",
            signalled.elapsed()
        );
        assert!(
            !output.status.success(),
            "{subcommand:?} stopped midway must not exit 0"
        );
        assert!(
            stderr(&output).contains("stopped by a signal"),
            "{subcommand:?}: {}",
            stderr(&output)
        );
    }
}
