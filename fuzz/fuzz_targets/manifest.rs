//! A manifest as restore reads it from the store; the checks are `properties::manifest`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../properties.rs"]
#[allow(dead_code)] // this target uses one of the two checks
mod properties;

fuzz_target!(|data: &[u8]| {
    properties::manifest(data);
});
