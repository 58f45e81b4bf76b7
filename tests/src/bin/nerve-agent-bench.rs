//! Measures a (release) nerve-agent binary against the metadata simulator and the API-server
//! stand-in: binary size, idle footprint, notice → subscriber and notice → cordon PATCH latency.
//! Run through `bench/agent`, which builds the binaries.
//!
//! The last lines judge each figure against its target (issue 2, docs/agent.md): met or
//! MISSED. Memory or CPU over the agent's budget (DESIGN.md: under 50 MiB and 0.1 vCPU at all
//! times) is a wrong result, not a missed target: the bench then exits 1.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use nerve_notice::StreamEvent;
use nerve_tests::apiserver::ApiServer;
use nerve_tests::imds::MetadataSimulator;
use time::OffsetDateTime;

/// Upper bound for any single wait of the bench (a notice, a cordon, readiness).
const WAIT: Duration = Duration::from_secs(30);
/// The agent's poll interval in every measurement: the product default, which the latency
/// target is stated for.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

const MIB: f64 = 1024.0 * 1024.0;
/// Targets (issue 2): a stripped release binary under 10 MiB ...
const BINARY_TARGET_MIB: f64 = 10.0;
/// ... under 10 MiB of memory, idle or after cordon cycles ...
const RSS_TARGET_MIB: f64 = 10.0;
/// ... under 0.001 vCPU on average when idle ...
const IDLE_CPU_TARGET_VCPU: f64 = 0.001;
/// ... and a notice at the subscriber and the cordon PATCH at the API server within one poll
/// interval plus this.
const LATENCY_TARGET_OVER_POLL: Duration = Duration::from_millis(100);
/// The budget (DESIGN.md "Footprint"): the agent must stay under 50 MiB and 0.1 vCPU at all
/// times. Over it is a wrong result.
const RSS_BUDGET_MIB: f64 = 50.0;
const CPU_BUDGET_VCPU: f64 = 0.1;

#[derive(Parser)]
#[command(about = "Measure nerve-agent's footprint and notice latency")]
struct Args {
    /// The agent binary to measure.
    #[arg(long)]
    agent: PathBuf,
    /// Latency trials.
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// Idle period for the footprint measurement.
    #[arg(long, default_value = "60s", value_parser = humantime_duration)]
    idle: Duration,
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim_end_matches('s')
        .parse()
        .map_err(|_| "expected seconds such as 60s".to_owned())?;
    Ok(Duration::from_secs_f64(secs))
}

struct Agent {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn start_agent(
    binary: &Path,
    sim: &MetadataSimulator,
    kubeconfig: Option<&Path>,
) -> anyhow::Result<Agent> {
    let addr = free_addr()?;
    let mut command = Command::new(binary);
    command
        .args(["--metadata-url", &sim.url(), "--listen", &addr.to_string()])
        .args([
            "--poll-interval",
            &format!("{}ms", POLL_INTERVAL.as_millis()),
        ])
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    match kubeconfig {
        Some(path) => command.env("KUBECONFIG", path).args([
            "--kubernetes",
            "on",
            "--node-name",
            "bench-node",
        ]),
        None => command.args(["--kubernetes", "off"]),
    };
    let child = command.spawn().context("starting the agent")?;
    let agent = Agent { child, addr };
    let started = Instant::now();
    while http_get(addr, "/readyz").map(|(s, _)| s) != Some(200) {
        if started.elapsed() > WAIT {
            bail!("the agent did not become ready");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(agent)
}

fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut tcp = TcpStream::connect(addr).ok()?;
    tcp.set_read_timeout(Some(WAIT)).ok()?;
    tcp.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .ok()?;
    let mut response = String::new();
    tcp.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    Some((status, response.split_once("\r\n\r\n")?.1.to_owned()))
}

/// (utime + stime in seconds, peak RSS in KiB, current RSS in KiB) of a process.
fn usage(pid: u32) -> anyhow::Result<(f64, u64, u64)> {
    let cpu = nerve_tests::process::cpu_seconds(pid)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Ok((cpu, kib("VmHWM:"), kib("VmRSS:")))
}

/// Prints median, max and min of `samples`; returns the max.
fn summary(name: &str, samples: &mut [Duration]) -> Duration {
    samples.sort();
    let median = samples[samples.len() / 2];
    let max = samples[samples.len() - 1];
    let min = samples[0];
    println!(
        "{name}: median {:.1} ms, max {:.1} ms, min {:.1} ms over {} trials",
        median.as_secs_f64() * 1000.0,
        max.as_secs_f64() * 1000.0,
        min.as_secs_f64() * 1000.0,
        samples.len()
    );
    max
}

/// One figure judged against its target.
struct Verdict {
    met: bool,
    line: String,
}

fn verdict(met: bool, line: String) -> Verdict {
    Verdict { met, line }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.trials == 0 {
        bail!("--trials must be at least 1");
    }
    let mut verdicts = Vec::new();
    let mut over_budget = Vec::new();

    // 0. Binary size.
    let binary_mib = std::fs::metadata(&args.agent)
        .with_context(|| format!("reading {}", args.agent.display()))?
        .len() as f64
        / MIB;
    println!("binary: {} = {binary_mib:.2} MiB", args.agent.display());
    verdicts.push(verdict(
        binary_mib < BINARY_TARGET_MIB,
        format!("binary {binary_mib:.2} MiB (target < {BINARY_TARGET_MIB} MiB, stripped release)"),
    ));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    // 1. Idle footprint, bare-host mode, default 1 s poll.
    let sim = MetadataSimulator::start();
    let agent = start_agent(&args.agent, &sim, None)?;
    let pid = agent.child.id();
    let (cpu_before, _, _) = usage(pid)?;
    let polls_before = sim.requests();
    std::thread::sleep(args.idle);
    let (cpu_after, peak_kib, rss_kib) = usage(pid)?;
    let cpu = cpu_after - cpu_before;
    let vcpu = cpu / args.idle.as_secs_f64();
    let idle_peak_mib = peak_kib as f64 / 1024.0;
    println!(
        "idle {}s (--kubernetes off, 1s polls, {} metadata requests): peak RSS {:.1} MiB, RSS {:.1} MiB, \
         CPU {:.2} s = {:.5} vCPU",
        args.idle.as_secs(),
        sim.requests() - polls_before,
        idle_peak_mib,
        rss_kib as f64 / 1024.0,
        cpu,
        vcpu
    );
    drop(agent);
    verdicts.push(verdict(
        idle_peak_mib < RSS_TARGET_MIB,
        format!("idle peak RSS {idle_peak_mib:.1} MiB (target < {RSS_TARGET_MIB} MiB)"),
    ));
    verdicts.push(verdict(
        vcpu < IDLE_CPU_TARGET_VCPU,
        format!("idle CPU {vcpu:.5} vCPU (target < {IDLE_CPU_TARGET_VCPU} vCPU)"),
    ));
    if idle_peak_mib >= RSS_BUDGET_MIB {
        over_budget.push(format!(
            "idle peak RSS {idle_peak_mib:.1} MiB >= {RSS_BUDGET_MIB} MiB"
        ));
    }
    if vcpu >= CPU_BUDGET_VCPU {
        over_budget.push(format!("idle CPU {vcpu:.5} vCPU >= {CPU_BUDGET_VCPU} vCPU"));
    }

    // 2. Latency, Kubernetes mode, default 1 s poll, one subscriber.
    let sim = MetadataSimulator::start();
    let api = ApiServer::start("bench-node");
    let dir = tempfile::tempdir()?;
    let kubeconfig = api.write_kubeconfig(dir.path());
    let agent = start_agent(&args.agent, &sim, Some(&kubeconfig))?;
    let (lines_tx, lines_rx) = mpsc::channel::<(Instant, StreamEvent)>();
    let mut tcp = TcpStream::connect(agent.addr)?;
    tcp.write_all(b"GET /v1/notices?watch=true HTTP/1.0\r\n\r\n")?;
    std::thread::spawn(move || {
        let mut reader = BufReader::new(tcp);
        let mut line = String::new();
        let mut body = false;
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            let at = Instant::now();
            if body {
                if let Ok(event) = serde_json::from_str::<StreamEvent>(line.trim_end()) {
                    let _ = lines_tx.send((at, event));
                }
            } else if line == "\r\n" {
                body = true;
            }
            line.clear();
        }
    });
    let mut to_subscriber = Vec::new();
    let mut to_patch = Vec::new();
    for trial in 0..args.trials {
        // Settle: no notice, node uncordoned, then wait a random fraction of a poll so the
        // notice lands at a random point of the poll cycle.
        sim.clear_spot_interruption();
        let settled = rt.block_on(api.wait_until(WAIT, |api| !api.unschedulable()));
        if !settled {
            bail!("trial {trial}: the node was never uncordoned");
        }
        std::thread::sleep(Duration::from_millis(300 + rand::random_range(0..1000u64)));
        while lines_rx.try_recv().is_ok() {}
        let patches_before = api.writes().len();
        let deadline = OffsetDateTime::now_utc() + Duration::from_secs(120 + trial as u64);
        let appeared = Instant::now();
        sim.set_spot_interruption("terminate", deadline);
        let received = loop {
            let (at, event) = lines_rx
                .recv_timeout(WAIT)
                .context("waiting for the notice line")?;
            if matches!(event, StreamEvent::Notice { .. }) {
                break at;
            }
        };
        to_subscriber.push(received - appeared);
        let cordoned = rt.block_on(api.wait_until(WAIT, |api| api.unschedulable()));
        if !cordoned {
            bail!("trial {trial}: the node was never cordoned");
        }
        let patch = api
            .writes()
            .into_iter()
            .skip(patches_before)
            .find(|w| w.method == "PATCH")
            .context("finding the cordon PATCH")?;
        to_patch.push(patch.at - appeared);
        eprintln!(
            "trial {trial}: subscriber {:.1} ms, cordon PATCH {:.1} ms",
            (received - appeared).as_secs_f64() * 1000.0,
            (patch.at - appeared).as_secs_f64() * 1000.0
        );
    }
    let (_, peak_kib, _) = usage(agent.child.id())?;
    let latency_target = POLL_INTERVAL + LATENCY_TARGET_OVER_POLL;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    for (name, samples) in [
        ("notice -> subscriber", &mut to_subscriber),
        ("notice -> cordon PATCH", &mut to_patch),
    ] {
        let max = summary(name, samples);
        verdicts.push(verdict(
            max <= latency_target,
            format!(
                "{name} max {:.0} ms (target <= poll + 100 ms = {:.0} ms)",
                ms(max),
                ms(latency_target)
            ),
        ));
    }
    let kube_peak_mib = peak_kib as f64 / 1024.0;
    println!(
        "peak RSS in Kubernetes mode after {} cordon/uncordon cycles: {kube_peak_mib:.1} MiB",
        args.trials,
    );
    verdicts.push(verdict(
        kube_peak_mib < RSS_TARGET_MIB,
        format!(
            "peak RSS after {} cordon cycles {kube_peak_mib:.1} MiB (target < {RSS_TARGET_MIB} MiB)",
            args.trials
        ),
    ));
    if kube_peak_mib >= RSS_BUDGET_MIB {
        over_budget.push(format!(
            "peak RSS in Kubernetes mode {kube_peak_mib:.1} MiB >= {RSS_BUDGET_MIB} MiB"
        ));
    }

    println!();
    println!("targets (issue 2):");
    for v in &verdicts {
        println!("  {} {}", if v.met { "met   " } else { "MISSED" }, v.line);
    }
    let missed = verdicts.iter().filter(|v| !v.met).count();
    if over_budget.is_empty() {
        println!(
            "result: {} targets met, {missed} missed; within the budget of {RSS_BUDGET_MIB} MiB \
             and {CPU_BUDGET_VCPU} vCPU",
            verdicts.len() - missed
        );
        Ok(())
    } else {
        println!(
            "WRONG RESULT: over the agent's budget: {}",
            over_budget.join("; ")
        );
        println!(
            "result: {} targets met, {missed} missed; OVER BUDGET",
            verdicts.len() - missed
        );
        std::process::exit(1);
    }
}
