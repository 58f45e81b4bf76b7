//! Stand-ins for the world around Nerve, used by the end-to-end tests, the demo and the
//! benchmarks: the cloud's metadata service, the Kubernetes API server, an S3-protocol server, a
//! fault-injecting proxy, and a trainer process. Nothing here ships in the product.

pub mod agent_process;
pub mod apiserver;
pub mod collective;
pub mod demo;
pub mod fault_proxy;
pub mod imds;
pub mod pod;
pub mod process;
pub mod s3;
pub mod trainer;

use std::path::PathBuf;

/// Path of a workspace binary (`nerve-agent`, `nerve-sidecar`, ...) built by the same cargo
/// invocation as the running test or tool.
///
/// Test executables live in `target/<profile>/deps/`, tools in `target/<profile>/`; the
/// binaries sit in `target/<profile>/`. `cargo nextest run --workspace` builds them because the
/// agent and sidecar packages have integration tests of their own.
pub fn binary_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current executable path");
    let mut dir = exe.parent().expect("executable has a parent").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --workspace --bins` (same profile) first",
        path.display()
    );
    path
}
