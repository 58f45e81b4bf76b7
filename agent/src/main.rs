use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use nerve_agent::config::LogFormat;
use nerve_agent::{Config, ConfigError};
use tokio_util::sync::CancellationToken;

/// Exit status for a bad flag or value (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// mimalloc, on purpose: the image links musl, whose malloc serialises threads on one lock, and
/// the same allocator on every libc keeps the glibc benchmarks true of the image (docs/deploy.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let config = match Config::try_parse() {
        Ok(config) => config,
        Err(err) => {
            let _ = err.print();
            return if err.use_stderr() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if let Err(err) = config.validate() {
        eprintln!("nerve-agent: {err}");
        return ExitCode::from(EXIT_CONFIG);
    }
    init_logging(config.log_format);
    // One thread is plenty for a poll a second and a few streams, and keeps the footprint small.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("nerve-agent: starting the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        nerve_agent::run(config, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            // `kubectl describe pod` shows this file's content as the termination message.
            let _ = std::fs::write("/dev/termination-log", format!("{err:#}\n"));
            if err.downcast_ref::<ConfigError>().is_some() {
                eprintln!("nerve-agent: {err:#}");
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Kubernetes sends SIGTERM to stop the pod; Ctrl-C sends SIGINT. The first starts a graceful
/// shutdown, a second one exits at once.
async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot listen for signals; stop the agent with SIGKILL");
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("shutting down");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    std::process::exit(130);
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}
