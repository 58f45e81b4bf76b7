//! One line of the agent's watch stream as the sidecar reads it. Whatever the bytes, parsing
//! must not panic, and a line that parses must serialise back to a line that parses the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nerve_notice::StreamEvent;

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = serde_json::from_slice::<StreamEvent>(data) {
        let line = event.to_line();
        let again: StreamEvent = serde_json::from_str(line.trim_end()).expect("re-parse");
        assert_eq!(again, event);
    }
});
