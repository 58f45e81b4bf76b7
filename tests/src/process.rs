//! A child process of an end-to-end test or a benchmark: every line it prints (stdout and stderr)
//! is collected as it comes, with the moment it was read, JSON lines can be waited for (trainer
//! events, the binaries' JSON logs), and the process is killed when dropped, its output printed
//! if a test failed.
//!
//! Two flavours of every wait: `try_*` returns an error naming what was awaited and what the
//! process said (for the benchmarks, which report and exit), the plain one panics with it
//! (test support: a failed step is a failed test).

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

/// Pause between checks of a [`wait_for`] condition: short next to any interval under test.
const RECHECK: Duration = Duration::from_millis(50);
/// Pause between looks for an awaited line: the benchmarks time lines by when they were read,
/// so this only bounds how late a wait returns, never the figure.
const LINE_RECHECK: Duration = Duration::from_millis(5);
/// After a process exits, its output readers get this long to hand over the last lines before
/// a wait for a line gives up.
const EXIT_DRAIN: Duration = Duration::from_secs(1);
/// Lines of output quoted when a wait fails.
const QUOTED_LINES: usize = 20;
/// Clock ticks per second of /proc/PID/stat times: USER_HZ is 100 on every Linux ABI.
const USER_HZ: f64 = 100.0;
/// Bound on one command a test runs to completion ([`run_bounded`]); generous for a loaded
/// 2-core machine, never a speed claim.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// One line a process printed, with the moment it was read.
type Line = (Instant, String);

/// A child process whose output lines are collected, killed when dropped.
pub struct Proc {
    name: &'static str,
    child: Mutex<Child>,
    lines: Arc<Mutex<Vec<Line>>>,
}

impl Proc {
    pub fn spawn(name: &'static str, command: &mut Command) -> Proc {
        Proc::try_spawn(name, command).unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn try_spawn(name: &'static str, command: &mut Command) -> anyhow::Result<Proc> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let readers: [Box<dyn std::io::Read + Send>; 2] = [
            Box::new(child.stdout.take().context("the child's stdout")?),
            Box::new(child.stderr.take().context("the child's stderr")?),
        ];
        for reader in readers {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(reader).lines().map_while(Result::ok) {
                    lock(&lines).push((Instant::now(), line));
                }
            });
        }
        Ok(Proc {
            name,
            child: Mutex::new(child),
            lines,
        })
    }

    pub fn pid(&self) -> i32 {
        lock(&self.child).id() as i32
    }

    pub fn output(&self) -> String {
        let lines = lock(&self.lines);
        let text: Vec<&str> = lines.iter().map(|(_, line)| line.as_str()).collect();
        text.join("\n")
    }

    /// JSON lines of the output (trainer events, JSON logs).
    pub fn json_lines(&self) -> Vec<Value> {
        self.timed_json_lines()
            .into_iter()
            .map(|(_, value)| value)
            .collect()
    }

    /// JSON lines of the output, each with the moment it was read.
    pub fn timed_json_lines(&self) -> Vec<(Instant, Value)> {
        lock(&self.lines)
            .iter()
            .filter_map(|(at, line)| Some((*at, serde_json::from_str(line).ok()?)))
            .collect()
    }

    /// Waits for a JSON line `pick` accepts.
    pub fn wait_json(&self, what: &str, timeout: Duration, pick: impl Fn(&Value) -> bool) -> Value {
        self.try_wait_json(what, timeout, pick)
            .map(|(_, value)| value)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// The first JSON line `pick` accepts, with the moment it was read. Fails when the process
    /// exits without printing it, or after `timeout`.
    pub fn try_wait_json(
        &self,
        what: &str,
        timeout: Duration,
        pick: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<(Instant, Value)> {
        let until = Instant::now() + timeout;
        let mut exited: Option<(Instant, ExitStatus)> = None;
        loop {
            if exited.is_none()
                && let Ok(Some(status)) = lock(&self.child).try_wait()
            {
                exited = Some((Instant::now(), status));
            }
            if let Some(found) = self
                .timed_json_lines()
                .into_iter()
                .find(|(_, value)| pick(value))
            {
                return Ok(found);
            }
            if let Some((at, status)) = exited
                && at.elapsed() > EXIT_DRAIN
            {
                bail!(
                    "{} exited ({status}) without printing {what}; its last lines:\n{}",
                    self.name,
                    self.last_lines()
                );
            }
            if Instant::now() >= until {
                bail!(
                    "{what}: {} did not print it within {timeout:?}; its last lines:\n{}",
                    self.name,
                    self.last_lines()
                );
            }
            std::thread::sleep(LINE_RECHECK);
        }
    }

    fn last_lines(&self) -> String {
        let lines = lock(&self.lines);
        let start = lines.len().saturating_sub(QUOTED_LINES);
        let text: Vec<&str> = lines[start..].iter().map(|(_, l)| l.as_str()).collect();
        text.join("\n")
    }

    /// A log line's message (tracing's JSON format: `fields.message`).
    pub fn log(&self, message: &str, timeout: Duration) -> Value {
        self.try_log(message, timeout)
            .map(|(_, value)| value)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn try_log(&self, message: &str, timeout: Duration) -> anyhow::Result<(Instant, Value)> {
        self.try_wait_json(&format!("log `{message}`"), timeout, |v| {
            v["fields"]["message"].as_str() == Some(message)
        })
    }

    pub fn has_log(&self, message: &str) -> Option<Value> {
        self.json_lines()
            .into_iter()
            .find(|v| v["fields"]["message"].as_str() == Some(message))
    }

    pub fn event(&self, event: &str, timeout: Duration) -> Value {
        self.try_event(event, timeout)
            .map(|(_, value)| value)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// A trainer event (`{"event": ...}`), with the moment its line was read.
    pub fn try_event(&self, event: &str, timeout: Duration) -> anyhow::Result<(Instant, Value)> {
        self.try_wait_json(&format!("trainer event `{event}`"), timeout, |v| {
            v["event"].as_str() == Some(event)
        })
    }

    pub fn send(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal)
            .unwrap_or_else(|e| panic!("signalling {}: {e}", self.name));
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.get_mut().unwrap_or_else(|p| p.into_inner());
        wait_for("process exit", timeout, || child.try_wait().ok().flatten())
            .unwrap_or_else(|| panic!("{} did not exit; it said:\n{}", self.name, self.output()))
    }

    pub fn is_alive(&mut self) -> bool {
        let child = self.child.get_mut().unwrap_or_else(|p| p.into_inner());
        child.try_wait().ok().flatten().is_none()
    }

    /// CPU time the process used so far (user + system, all its threads), from /proc/PID/stat.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds(lock(&self.child).id())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|p| p.into_inner());
        let _ = child.kill();
        let _ = child.wait();
        if std::thread::panicking() {
            eprintln!("--- {} output ---\n{}", self.name, self.output());
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// CPU time process `pid` used so far (utime + stime of /proc/PID/stat), in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The name (field 2) may hold spaces and parentheses; the fields after it do not.
    let after_name = stat
        .rsplit_once(')')
        .with_context(|| format!("parsing {path}"))?
        .1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are at 11 and 12 after the name.
    let ticks = |index: usize| -> anyhow::Result<u64> {
        fields
            .get(index)
            .with_context(|| format!("{path} has no field {}", index + 3))?
            .parse::<u64>()
            .with_context(|| format!("parsing field {} of {path}", index + 3))
    };
    Ok((ticks(11)? + ticks(12)?) as f64 / USER_HZ)
}

/// Checks `check` until it gives a value or `timeout` passes.
pub fn wait_for<T>(
    _what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Option<T> {
    let until = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= until {
            return None;
        }
        std::thread::sleep(RECHECK);
    }
}

/// Runs a command to completion within [`COMMAND_TIMEOUT`], killing it if it overruns.
pub fn run_bounded(command: &mut Command) -> Output {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_bounded(child, &format!("{command:?}"))
}

/// Waits for a child started with piped output, at most [`COMMAND_TIMEOUT`]; a child that
/// overruns is killed and fails the test (a wait without a bound is the bug).
pub fn wait_bounded(mut child: Child, what: &str) -> Output {
    let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
    let readers = std::thread::spawn(move || {
        let (mut o, mut e) = (Vec::new(), Vec::new());
        if let Some(out) = out.as_mut() {
            let _ = out.read_to_end(&mut o);
        }
        if let Some(err) = err.as_mut() {
            let _ = err.read_to_end(&mut e);
        }
        (o, e)
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > COMMAND_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            let (_, e) = readers.join().unwrap_or_default();
            panic!(
                "{what} did not finish within {COMMAND_TIMEOUT:?} (a wait without a bound); \
                 stderr:\n{}",
                String::from_utf8_lossy(&e)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (stdout, stderr) = readers.join().unwrap_or_default();
    Output {
        status,
        stdout,
        stderr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_found_with_the_moment_it_was_read() {
        let before = Instant::now();
        let proc = Proc::spawn(
            "sh",
            Command::new("sh").args(["-c", r#"echo '{"event":"started"}'; exec sleep 5"#]),
        );
        let (at, value) = proc.try_event("started", Duration::from_secs(10)).unwrap();
        assert_eq!(value["event"], "started");
        assert!(at >= before);
    }

    #[test]
    fn a_wait_fails_soon_after_the_process_exits_without_the_line() {
        let proc = Proc::spawn("sh", Command::new("sh").args(["-c", "echo bye"]));
        let started = Instant::now();
        let error = proc
            .try_event("started", Duration::from_secs(30))
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        let message = format!("{error:#}");
        assert!(
            message.contains("exited") && message.contains("bye"),
            "{message}"
        );
    }

    #[test]
    fn cpu_seconds_of_a_busy_process_grow() {
        let proc = Proc::spawn("sh", Command::new("sh").args(["-c", "while :; do :; done"]));
        let first = proc.cpu_seconds().unwrap();
        let grew = wait_for("CPU time", Duration::from_secs(10), || {
            (proc.cpu_seconds().unwrap() > first).then_some(())
        });
        assert!(grew.is_some(), "a busy loop used no CPU time in 10 s");
    }
}
