//! nerve-sidecar: parse flags, set up logging, run the subcommand.

use std::process::ExitCode;

use clap::Parser;
use nerve_sidecar::cli::{Cli, Command, EXIT_CONFIG, LogFormat};
use nerve_sidecar::transfer;
use tokio_util::sync::CancellationToken;

/// Where Kubernetes looks for a container's last words (`kubectl describe pod`).
const TERMINATION_LOG: &str = "/dev/termination-log";

/// mimalloc, on purpose: the image links musl, whose malloc serialises threads on one lock, and
/// the same allocator on every libc keeps the glibc benchmarks true of the image (docs/deploy.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Transparent huge pages off for this process (what MIMALLOC_ALLOW_THP=0 does): mimalloc
    // asks for them for its arenas, and on a node with THP enabled each touched 2 MiB then
    // counts in full against the container's memory. Measured on the 2-3 GiB uploads of
    // bench/transfer: 96-118 MiB peak RSS with them, 54-80 MiB without (docs/deploy.md,
    // "Allocator"). Best effort: a kernel without the flag has no THP to turn off.
    let _ = nix::sys::prctl::set_thp_disable(true);
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let code = if err.use_stderr() { EXIT_CONFIG } else { 0 };
            let _ = err.print();
            return ExitCode::from(code);
        }
    };
    init_logging(cli.log_format);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Command::Restore(args) = &cli.command {
        builder.worker_threads(nerve_store::restore::worker_threads(
            args.checkpoint.transfer.concurrency,
        ));
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => return fail(&anyhow::Error::new(err).context("starting the async runtime")),
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        match cli.command {
            Command::Run(args) => nerve_sidecar::run::command(*args, shutdown).await,
            Command::Upload(args) => transfer::upload_command(args, shutdown).await,
            Command::Restore(args) => transfer::restore_command(args, shutdown).await,
            Command::List(args) => transfer::list_command(args, shutdown).await,
            Command::Prune(args) => transfer::prune_command(args, shutdown).await,
            Command::Inject(args) => nerve_sidecar::inject::inject_command(&args),
            Command::Webhook(args) => nerve_sidecar::inject::serve_webhook(args, shutdown).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(&err),
    }
}

/// Kubernetes sends SIGTERM on pod deletion; Ctrl-C on a terminal. The first cancels the work
/// (which then cleans up after itself); a second one exits at once.
async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot listen for SIGTERM/SIGINT; signals will kill the process outright");
        return;
    };
    for round in 0..2 {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if round == 0 {
            tracing::warn!("signal received, stopping (send again to exit at once)");
            shutdown.cancel();
        }
    }
    std::process::exit(130);
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn fail(err: &anyhow::Error) -> ExitCode {
    let message = format!("{err:#}");
    tracing::error!("{message}");
    if std::path::Path::new(TERMINATION_LOG).exists() {
        let _ = std::fs::write(TERMINATION_LOG, &message);
    }
    if err.downcast_ref::<nerve_sidecar::ConfigError>().is_some() {
        ExitCode::from(EXIT_CONFIG)
    } else {
        ExitCode::FAILURE
    }
}
