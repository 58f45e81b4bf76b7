//! A manifest as restore reads it from the store: parse, then validate against its generation
//! and the job's prefix. Whatever the bytes, this must not panic, and a manifest that validates
//! must name only plain relative paths (restore writes them under --dir unchecked after this).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nerve_store::manifest::check_relative_path;
use nerve_store::{Generation, Manifest};

const PREFIX: &str = "ckpt/job/gen/";

fuzz_target!(|data: &[u8]| {
    let Ok(manifest) = serde_json::from_slice::<Manifest>(data) else {
        return;
    };
    let generation = Generation::parse(&manifest.generation)
        .unwrap_or_else(|_| Generation::parse("20261124T020000000Z-00000001").expect("valid id"));
    if manifest.validate(&generation, PREFIX).is_ok() {
        for file in &manifest.files {
            assert!(check_relative_path(&file.path).is_ok(), "{:?}", file.path);
            assert!(!file.path.split('/').any(|s| s == ".." || s.is_empty()));
            assert!(file.key.starts_with(PREFIX), "{:?}", file.key);
        }
        // What validates survives a round trip unchanged.
        let again: Manifest =
            serde_json::from_slice(&serde_json::to_vec(&manifest).expect("serialise"))
                .expect("re-parse");
        assert_eq!(again, manifest);
    }
});
