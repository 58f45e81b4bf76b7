//! The fuzz targets' seed corpora (`fuzz/seeds/*`) replayed as ordinary tests: every seed goes
//! through the same checks the libFuzzer targets run (`fuzz/properties.rs`), so the targets'
//! properties and the APIs they call are built and exercised by every test run, while `fuzz/`
//! itself is built only by `cargo fuzz`.

use std::path::PathBuf;

#[path = "../../fuzz/properties.rs"]
mod properties;

/// Every seed file of one target, by file name, sorted.
fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target);
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("seed entry").path();
            let name = path
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            (name, std::fs::read(&path).expect("seed bytes"))
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

/// Runs `check` on every seed of `target`, naming the seed that fails; returns the seeds that
/// got past parsing.
fn replay(target: &str, check: fn(&[u8]) -> bool) -> Vec<String> {
    let mut deep = Vec::new();
    for (name, data) in seeds(target) {
        let passed = std::panic::catch_unwind(|| check(&data));
        match passed {
            Ok(true) => deep.push(name),
            Ok(false) => {}
            Err(_) => panic!("fuzz/seeds/{target}/{name} fails the {target} target's checks"),
        }
    }
    deep
}

#[test]
fn every_manifest_seed_passes_the_manifest_targets_checks() {
    let deep = replay("manifest", properties::manifest);
    assert!(
        deep.contains(&"manifest.json".to_owned()),
        "the valid manifest seed no longer validates, so its checks never ran: {deep:?}"
    );
}

#[test]
fn every_notice_line_seed_passes_the_notice_targets_checks() {
    let deep = replay("notice", properties::notice_line);
    for seed in ["heartbeat.json", "notice.json", "snapshot.json"] {
        assert!(
            deep.iter().any(|d| d == seed),
            "{seed} no longer parses, so its round trip was never checked: {deep:?}"
        );
    }
    // The out-of-range offsets are refused, not parsed (fuzz/README.md).
    assert!(!deep.iter().any(|d| d.starts_with("offset-")), "{deep:?}");
}
