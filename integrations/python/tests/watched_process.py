"""A child process of a test whose JSON-line events are collected as it prints them, and that is
killed when the test ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from typing import Dict, List

# Generous: a loaded 2-core CI machine starting several Python processes (and torch) at once.
STARTUP_TIMEOUT = 120.0
EVENT_TIMEOUT = 60.0
# After a process exited, how long its last lines may take to reach the reader threads.
OUTPUT_DRAIN = 1.0


class WatchedProcess:
    """A test's child process: the JSON events it prints are collected as they come."""

    def __init__(self, name: str, argv: List[str], env: Dict[str, str]) -> None:
        self.name = name
        self.process = subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.events: List[dict] = []
        self.stderr: List[str] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._collect_events, daemon=True).start()
        threading.Thread(target=self._collect_stderr, daemon=True).start()

    def _collect_events(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                self.events.append(event)

    def _collect_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._lock:
                self.stderr.append(line.rstrip("\n"))

    def output(self) -> str:
        with self._lock:
            return "\n".join([json.dumps(e) for e in self.events] + self.stderr)

    def wait_event(self, name: str, timeout: float = EVENT_TIMEOUT, **fields) -> dict:
        deadline = time.monotonic() + timeout
        exited_at = None
        while time.monotonic() < deadline:
            with self._lock:
                for event in self.events:
                    if event["event"] == name and all(event.get(k) == v for k, v in fields.items()):
                        return event
            if self.process.poll() is not None:
                exited_at = exited_at or time.monotonic()
                # The output threads drain what the process printed before it exited.
                if time.monotonic() - exited_at > OUTPUT_DRAIN:
                    break
            time.sleep(0.01)
        raise AssertionError(f"{self.name} (exit {self.process.poll()}): no `{name}` event {fields}; it said:\n{self.output()}")

    def events_named(self, name: str) -> List[dict]:
        with self._lock:
            return [e for e in self.events if e["event"] == name]

    def send(self, signum: signal.Signals) -> None:
        os.kill(self.process.pid, signum)

    def wait_exit(self, timeout: float = EVENT_TIMEOUT) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit; it said:\n{self.output()}") from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
