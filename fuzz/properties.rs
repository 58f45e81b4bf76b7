//! What the fuzz targets check, in one place: the libFuzzer targets (`fuzz_targets/*.rs`) call
//! these on every input, and the workspace test `tests/tests/fuzz_seeds.rs` calls them on every
//! seed in `seeds/`, so the properties and the APIs they use are built and run by
//! `cargo nextest run --workspace` even though this directory is not a workspace member.
//!
//! Each function panics when a property fails, and returns whether the input got past parsing
//! to the deeper checks (so the seed replay can tell a corpus that exercises nothing).

use nerve_notice::StreamEvent;
use nerve_store::manifest::check_relative_path;
use nerve_store::{Generation, Manifest};

/// The job prefix the manifest target validates against.
pub const PREFIX: &str = "ckpt/job/gen/";

/// A manifest as restore reads it from the store: parse, then validate against its generation
/// and the job's prefix. Whatever the bytes, this must not panic, and a manifest that validates
/// must name only plain relative paths (restore writes them under --dir unchecked after this)
/// and survive a JSON round trip unchanged. True when the manifest validated.
pub fn manifest(data: &[u8]) -> bool {
    let Ok(manifest) = serde_json::from_slice::<Manifest>(data) else {
        return false;
    };
    let generation = Generation::parse(&manifest.generation)
        .unwrap_or_else(|_| Generation::parse("20261124T020000000Z-00000001").expect("valid id"));
    if manifest.validate(&generation, PREFIX).is_err() {
        return false;
    }
    for file in &manifest.files {
        assert!(check_relative_path(&file.path).is_ok(), "{:?}", file.path);
        assert!(!file.path.split('/').any(|s| s == ".." || s.is_empty()));
        match &file.link {
            // A link stays inside the directory and has no bytes of its own.
            Some(target) => {
                let dir = file.path.rsplit_once('/').map_or("", |(dir, _)| dir);
                assert!(
                    nerve_store::manifest::resolve_link(dir, target).is_some(),
                    "{target:?}"
                );
            }
            None => assert!(file.key.starts_with(PREFIX), "{:?}", file.key),
        }
    }
    let again: Manifest =
        serde_json::from_slice(&serde_json::to_vec(&manifest).expect("serialise"))
            .expect("re-parse");
    assert_eq!(again, manifest);
    true
}

/// One line of the agent's watch stream as the sidecar reads it. Whatever the bytes, parsing
/// must not panic, and a line that parses must serialise back to a line that parses the same.
/// True when the line parsed.
pub fn notice_line(data: &[u8]) -> bool {
    let Ok(event) = serde_json::from_slice::<StreamEvent>(data) else {
        return false;
    };
    let line = event.to_line();
    let again: StreamEvent = serde_json::from_str(line.trim_end()).expect("re-parse");
    assert_eq!(again, event);
    true
}
