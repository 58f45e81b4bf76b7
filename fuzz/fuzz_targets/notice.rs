//! One line of the agent's watch stream as the sidecar reads it; the checks are
//! `properties::notice_line`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../properties.rs"]
#[allow(dead_code)] // this target uses one of the two checks
mod properties;

fuzz_target!(|data: &[u8]| {
    properties::notice_line(data);
});
