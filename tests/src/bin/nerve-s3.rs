//! nerve-s3: the tests' S3-protocol server as a process, for the benchmarks and the demo.
//!
//! Prints `endpoint=http://127.0.0.1:PORT` on stdout once it is listening, then serves until
//! SIGTERM or Ctrl-C. Clients use the credentials in `nerve_tests::s3` (printed too).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use nerve_tests::s3::{ACCESS_KEY, REGION, S3Server, SECRET_KEY};

#[derive(Debug, Parser)]
#[command(
    name = "nerve-s3",
    about = "A local S3-protocol server (s3s + s3s-fs) for tests and benchmarks"
)]
struct Args {
    /// Directory to store buckets and objects in (created if missing).
    #[arg(long)]
    root: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Buckets to create at start.
    #[arg(long = "bucket")]
    buckets: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.root)?;
    let server = S3Server::start_at(&args.root, args.listen)?;
    for bucket in &args.buckets {
        server.create_bucket(bucket)?;
    }
    println!("endpoint={}", server.endpoint());
    println!("access_key={ACCESS_KEY}");
    println!("secret_key={SECRET_KEY}");
    println!("region={REGION}");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        anyhow::Ok(())
    })?;
    drop(server);
    Ok(())
}
