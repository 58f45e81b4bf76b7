//! Finding the trainer among the pod's processes and signalling it safely.
//!
//! The sidecar shares the pod's process namespace. A process is a candidate when it is not the
//! sidecar, not one of its descendants, not PID 1 (the pause process), not a zombie or kernel
//! thread, its command line matches `--target` (when given), and it runs in the trainer's
//! container (when `--container` names it: the injector sets `NERVE_CONTAINER=<name>` in the
//! trainer container's environment, which its processes inherit). A candidate is signalled only
//! when it has a handler installed for the signal (its bit in `SigCgt` of `/proc/PID/status`):
//! a process without one would be killed by the default action, losing the very state we want.
//!
//! Go programs (a mesh proxy, a secrets agent) show a handler for every signal and still exit
//! on most of them, so an unrestricted scan must not signal across containers: without
//! `--target` or `--container`, when the processes that handle the signal sit in more than one
//! container (cgroup), none is signalled and the sidecar says how to name the trainer. Where the
//! scan would cover a whole host (PID 1 is the host's init: systemd on bare EC2, or a `hostPID`
//! pod), `run` refuses to start without one of them.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use regex::Regex;

/// Where the kernel shows processes.
const PROC: &str = "/proc";

/// The environment variable naming a container, set in the trainer container by the injector.
pub const CONTAINER_ENV: &str = "NERVE_CONTAINER";

/// Which processes may be the trainer.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// `--target`: a regex on the command line.
    pub target: Option<Regex>,
    /// `--container`: the value of [`CONTAINER_ENV`] in the trainer's environment.
    pub container: Option<String>,
}

impl Scope {
    fn is_restricted(&self) -> bool {
        self.target.is_some() || self.container.is_some()
    }

    /// Refuses a scope that would reach every process of a host.
    pub fn check(&self) -> Result<(), String> {
        self.check_on(pid_one_is_host_init())
    }

    fn check_on(&self, host_wide: bool) -> Result<(), String> {
        if self.is_restricted() || !host_wide {
            return Ok(());
        }
        Err("--target (or --container) is required here: this process sees the whole host's              processes (PID 1 is the host's init: systemd on bare EC2, or a hostPID pod), and              signalling every process with a handler would reach programs that are not the              trainer; set --target to a regex on the trainer's command line, e.g.              --target 'python.*train'"
            .to_owned())
    }

    fn admits(&self, pid: i32, command: &str) -> bool {
        if self.target.as_ref().is_some_and(|t| !t.is_match(command)) {
            return false;
        }
        match &self.container {
            Some(name) => read_environ_var(pid, CONTAINER_ENV).as_deref() == Some(name.as_str()),
            None => true,
        }
    }
}

/// PID 1 is systemd or init: this PID namespace is a host's, not a container's or a pod's.
fn pid_one_is_host_init() -> bool {
    fs::read_to_string(Path::new(PROC).join("1").join("comm"))
        .is_ok_and(|comm| matches!(comm.trim(), "systemd" | "init"))
}

/// The value of `name` in a process's environment (readable for the same user, or with
/// CAP_SYS_PTRACE).
fn read_environ_var(pid: i32, name: &str) -> Option<String> {
    let raw = fs::read(Path::new(PROC).join(pid.to_string()).join("environ")).ok()?;
    raw.split(|b| *b == 0).find_map(|entry| {
        let entry = std::str::from_utf8(entry).ok()?;
        let (key, value) = entry.split_once('=')?;
        (key == name).then(|| value.to_owned())
    })
}

/// One process of the pod, as read from `/proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodProcess {
    pub pid: i32,
    /// The command line, arguments joined by spaces.
    pub command: String,
    /// Its cgroup (`/proc/PID/cgroup`): one per container in a pod.
    pub cgroup: String,
}

/// The candidates of one scan, split by whether they handle the signal.
#[derive(Debug, Default)]
pub struct Candidates {
    pub handling: Vec<PodProcess>,
    pub not_handling: Vec<PodProcess>,
}

impl Candidates {
    /// Every candidate, handler or not: the processes that may be writing the checkpoint.
    pub fn all(&self) -> impl Iterator<Item = &PodProcess> {
        self.handling.iter().chain(&self.not_handling)
    }
}

/// What signalling achieved.
#[derive(Debug, Default)]
pub struct SignalReport {
    pub signalled: Vec<PodProcess>,
    /// Candidates left alone because they have no handler for the signal.
    pub skipped: Vec<PodProcess>,
    /// Candidates the kernel refused to signal (`EPERM`: another user, no `CAP_KILL`).
    pub refused: Vec<(PodProcess, nix::Error)>,
    /// Without `--target`/`--container`, handlers were found in several containers: nobody was
    /// signalled.
    pub ambiguous: bool,
}

/// Status fields of one process that matter here.
#[derive(Debug, Clone, Copy)]
struct Status {
    ppid: i32,
    caught: u64,
    zombie: bool,
}

fn read_status(pid: i32) -> Option<Status> {
    let text = fs::read_to_string(Path::new(PROC).join(pid.to_string()).join("status")).ok()?;
    parse_status(&text)
}

/// Reads `PPid`, `SigCgt` and `State` from the text of `/proc/PID/status`.
fn parse_status(text: &str) -> Option<Status> {
    let mut ppid = None;
    let mut caught = None;
    let mut zombie = false;
    for line in text.lines() {
        if let Some(value) = line.strip_prefix("PPid:") {
            ppid = value.trim().parse().ok();
        } else if let Some(value) = line.strip_prefix("SigCgt:") {
            caught = u64::from_str_radix(value.trim(), 16).ok();
        } else if let Some(value) = line.strip_prefix("State:") {
            zombie = value.trim_start().starts_with(['Z', 'X']);
        }
    }
    Some(Status {
        ppid: ppid?,
        caught: caught?,
        zombie,
    })
}

/// Whether the `SigCgt` mask has a handler for `signal` (bit `signo - 1`).
fn catches(caught: u64, signal: Signal) -> bool {
    let bit = (signal as i32) - 1;
    (0..64).contains(&bit) && caught & (1u64 << bit) != 0
}

fn read_command(pid: i32) -> Option<String> {
    let raw = fs::read(Path::new(PROC).join(pid.to_string()).join("cmdline")).ok()?;
    let command = raw
        .split(|b| *b == 0)
        .filter(|part| !part.is_empty())
        .map(String::from_utf8_lossy)
        .collect::<Vec<_>>()
        .join(" ");
    // Kernel threads have an empty command line.
    (!command.is_empty()).then_some(command)
}

/// Scans `/proc` for the processes that could be the trainer.
pub fn find_candidates(signal: Signal, scope: &Scope) -> std::io::Result<Candidates> {
    let me = std::process::id() as i32;
    let mut statuses = HashMap::new();
    for entry in fs::read_dir(PROC)? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // A process that exits between listing and reading simply drops out.
        if let Some(status) = read_status(pid) {
            statuses.insert(pid, status);
        }
    }
    let descends_from_me = |mut pid: i32| {
        // Bounded walk: a parent chain cannot be longer than the process table.
        for _ in 0..statuses.len() {
            if pid == me {
                return true;
            }
            match statuses.get(&pid) {
                Some(status) if status.ppid > 0 => pid = status.ppid,
                _ => return false,
            }
        }
        false
    };
    let mut candidates = Candidates::default();
    let mut pids: Vec<_> = statuses.keys().copied().collect();
    pids.sort_unstable();
    for pid in pids {
        let status = statuses[&pid];
        if pid == 1 || status.zombie || descends_from_me(pid) {
            continue;
        }
        let Some(command) = read_command(pid) else {
            continue;
        };
        if !scope.admits(pid, &command) {
            continue;
        }
        let cgroup = fs::read_to_string(Path::new(PROC).join(pid.to_string()).join("cgroup"))
            .unwrap_or_default();
        let process = PodProcess {
            pid,
            command,
            cgroup,
        };
        if catches(status.caught, signal) {
            candidates.handling.push(process);
        } else {
            candidates.not_handling.push(process);
        }
    }
    Ok(candidates)
}

/// Sends `signal` to every candidate that handles it; never to one that does not, and, in an
/// unrestricted `scope`, to none when the handlers sit in several containers.
#[tracing::instrument(skip_all, fields(signal = %signal))]
pub fn signal_trainers(candidates: &Candidates, signal: Signal, scope: &Scope) -> SignalReport {
    let mut report = SignalReport {
        skipped: candidates.not_handling.clone(),
        ..SignalReport::default()
    };
    let containers: std::collections::BTreeSet<&str> = candidates
        .handling
        .iter()
        .map(|p| p.cgroup.as_str())
        .collect();
    if !scope.is_restricted() && containers.len() > 1 {
        let found: Vec<String> = candidates
            .handling
            .iter()
            .map(|p| format!("{} `{}`", p.pid, p.command))
            .collect();
        tracing::error!(
            processes = %found.join(", "),
            "processes in {} containers handle {signal}; signalling none of them (a sidecar such as              a mesh proxy would exit). Name the trainer with --target or --container              (the nerve.io/container annotation)",
            containers.len()
        );
        report.ambiguous = true;
        return report;
    }
    for process in &candidates.handling {
        match kill(Pid::from_raw(process.pid), signal) {
            Ok(()) => {
                tracing::info!(pid = process.pid, command = %process.command, "signalled the trainer");
                report.signalled.push(process.clone());
            }
            // Exited since the scan: nothing to signal.
            Err(nix::Error::ESRCH) => {}
            Err(error) => {
                tracing::error!(pid = process.pid, command = %process.command, %error,
                    "cannot signal the trainer (run the sidecar as the trainer's user or give it CAP_KILL)");
                report.refused.push((process.clone(), error));
            }
        }
    }
    for process in &report.skipped {
        tracing::warn!(pid = process.pid, command = %process.command,
            "not signalling a process that has no handler for {signal} (the default action would kill it)");
    }
    report
}

/// Parses a signal name as given to `--signal`: `SIGUSR1`, `USR1`, or a number.
pub fn parse_signal(value: &str) -> Result<Signal, String> {
    let upper = value.trim().to_ascii_uppercase();
    let named = if upper.starts_with("SIG") {
        upper.clone()
    } else {
        format!("SIG{upper}")
    };
    let signal = match upper.parse::<i32>() {
        Ok(number) => Signal::try_from(number).ok(),
        Err(_) => named.parse::<Signal>().ok(),
    };
    match signal {
        Some(Signal::SIGKILL | Signal::SIGSTOP) => Err(format!(
            "{value} cannot be handled by the trainer; use a signal it can catch, such as SIGUSR1"
        )),
        Some(signal) => Ok(signal),
        None => Err(format!(
            "`{value}` is not a signal name; use e.g. SIGUSR1, SIGUSR2 or SIGTERM"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_caught_mask_parent_and_state_from_proc_status() {
        let text = "Name:\ttrainer\nState:\tS (sleeping)\nPPid:\t7\nSigBlk:\t0000000000000000\n\
                    SigIgn:\t0000000000001000\nSigCgt:\t0000000100000640\n";
        let status = parse_status(text).unwrap();
        assert_eq!(status.ppid, 7);
        assert!(!status.zombie);
        assert!(catches(status.caught, Signal::SIGUSR1));
        assert!(!catches(status.caught, Signal::SIGUSR2));
        assert!(!catches(status.caught, Signal::SIGTERM));
        let zombie = parse_status("State:\tZ (zombie)\nPPid:\t1\nSigCgt:\t0\n").unwrap();
        assert!(zombie.zombie);
    }

    #[test]
    fn parses_signal_names_with_or_without_prefix_and_refuses_uncatchable_ones() {
        assert_eq!(parse_signal("SIGUSR1"), Ok(Signal::SIGUSR1));
        assert_eq!(parse_signal("usr2"), Ok(Signal::SIGUSR2));
        assert_eq!(parse_signal("15"), Ok(Signal::SIGTERM));
        assert!(parse_signal("SIGKILL").is_err());
        assert!(parse_signal("SIGWHAT").is_err());
    }

    #[test]
    fn never_lists_itself_or_its_own_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let candidates = find_candidates(Signal::SIGUSR1, &Scope::default()).unwrap();
        let pids: Vec<i32> = candidates.all().map(|p| p.pid).collect();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!pids.contains(&(std::process::id() as i32)));
        assert!(!pids.contains(&(child.id() as i32)));
        assert!(!pids.contains(&1));
    }

    #[test]
    fn a_container_scope_admits_only_processes_whose_environment_names_it() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env(CONTAINER_ENV, "trainer")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let scope = |name: &str| Scope {
            target: None,
            container: Some(name.to_owned()),
        };
        // Until the child has exec'd, /proc shows the parent's environment.
        let started = std::time::Instant::now();
        while read_command(pid).is_none_or(|c| !c.starts_with("sleep"))
            && started.elapsed() < std::time::Duration::from_secs(10)
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let admitted = scope("trainer").admits(pid, "sleep 30");
        let other = scope("istio-proxy").admits(pid, "sleep 30");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(admitted);
        assert!(!other);
    }

    #[test]
    fn handlers_in_two_containers_are_not_signalled_without_a_scope() {
        let process = |pid: i32, cgroup: &str| PodProcess {
            pid,
            command: "x".into(),
            cgroup: cgroup.into(),
        };
        // PIDs that cannot exist: a signal sent by mistake would fail loudly, not hit anyone.
        let candidates = Candidates {
            handling: vec![
                process(i32::MAX - 1, "0::/kubepods/pod1/trainer"),
                process(i32::MAX - 2, "0::/kubepods/pod1/istio-proxy"),
            ],
            not_handling: vec![],
        };
        let report = signal_trainers(&candidates, Signal::SIGUSR1, &Scope::default());
        assert!(report.ambiguous);
        assert!(report.signalled.is_empty() && report.refused.is_empty());
    }

    #[test]
    fn a_host_wide_process_table_needs_a_target_or_a_container() {
        let open = Scope::default();
        let err = open.check_on(true).unwrap_err();
        assert!(err.contains("--target"), "{err}");
        assert!(
            open.check_on(false).is_ok(),
            "a pod's or container's own namespace"
        );
        let targeted = Scope {
            target: Regex::new("python.*train").ok(),
            container: None,
        };
        assert!(targeted.check_on(true).is_ok());
        let contained = Scope {
            target: None,
            container: Some("trainer".into()),
        };
        assert!(contained.check_on(true).is_ok());
    }
}
