//! A child process of an end-to-end test: every line it prints (stdout and stderr) is collected
//! as it comes, JSON lines can be waited for (trainer events, the binaries' JSON logs), and the
//! process is killed when the test ends, its output printed if the test failed.
//!
//! Test support: every helper panics with a message naming what went wrong, because a failed
//! step is a failed test.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Pause between checks of a [`wait_for`] condition: short next to any interval under test.
const RECHECK: Duration = Duration::from_millis(50);

/// A child process whose output lines are collected, killed when the test ends.
pub struct Proc {
    name: &'static str,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(name: &'static str, command: &mut Command) -> Proc {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        for reader in [
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            Box::new(stderr),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(reader).lines().map_while(Result::ok) {
                    lines.lock().expect("output lines").push(line);
                }
            });
        }
        Proc { name, child, lines }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn output(&self) -> String {
        self.lines.lock().expect("output lines").join("\n")
    }

    /// JSON lines of the output (trainer events, JSON logs).
    pub fn json_lines(&self) -> Vec<Value> {
        self.lines
            .lock()
            .expect("output lines")
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits for a JSON line `pick` accepts.
    pub fn wait_json(&self, what: &str, timeout: Duration, pick: impl Fn(&Value) -> bool) -> Value {
        wait_for(what, timeout, || self.json_lines().into_iter().find(&pick))
            .unwrap_or_else(|| panic!("{what}; {} said:\n{}", self.name, self.output()))
    }

    /// A log line's message (tracing's JSON format: `fields.message`).
    pub fn log(&self, message: &str, timeout: Duration) -> Value {
        self.wait_json(&format!("log `{message}`"), timeout, |v| {
            v["fields"]["message"].as_str() == Some(message)
        })
    }

    pub fn has_log(&self, message: &str) -> Option<Value> {
        self.json_lines()
            .into_iter()
            .find(|v| v["fields"]["message"].as_str() == Some(message))
    }

    pub fn event(&self, event: &str, timeout: Duration) -> Value {
        self.wait_json(&format!("trainer event `{event}`"), timeout, |v| {
            v["event"].as_str() == Some(event)
        })
    }

    pub fn send(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal)
            .unwrap_or_else(|e| panic!("signalling {}: {e}", self.name));
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = &mut self.child;
        wait_for("process exit", timeout, || child.try_wait().ok().flatten())
            .unwrap_or_else(|| panic!("{} did not exit; it said:\n{}", self.name, self.output()))
    }

    pub fn is_alive(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- {} output ---\n{}", self.name, self.output());
        }
    }
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
