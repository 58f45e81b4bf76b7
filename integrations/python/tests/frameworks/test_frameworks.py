"""NerveCallback against the real Hugging Face Trainer and the real Lightning Trainer, with real
processes: DDP over gloo on CPU (torchrun for Hugging Face, Lightning's own launcher), a notice
signal to one rank, then SIGTERM as Kubernetes sends it (to the container's main process), then a
resume from what was saved. Skipped where the libraries are not installed: the script
`integrations/python/run-framework-tests` installs them into its own environment.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import sys
import tempfile
import time
import unittest
from pathlib import Path
from typing import Dict

import nerve_trainer
from watched_process import EVENT_TIMEOUT, STARTUP_TIMEOUT, WatchedProcess

HERE = Path(__file__).resolve().parent


def installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


class FrameworkRun(unittest.TestCase):
    def setUp(self) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="nerve-framework-test-"))
        self.addCleanup(shutil.rmtree, self.work, ignore_errors=True)
        self.checkpoints = self.work / "ckpt"
        self.checkpoints.mkdir()
        self.marker_path = self.checkpoints / ".nerve-done"

    def environment(self) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NERVE_")}
        env["NERVE_CHECKPOINT_DIR"] = str(self.checkpoints)
        env["PYTHONUNBUFFERED"] = "1"
        # Progress bars of the libraries' own saves would only clutter a failure's output.
        env["TQDM_DISABLE"] = "1"
        return env

    def start(self, name: str, argv) -> WatchedProcess:
        process = WatchedProcess(name, [str(a) for a in argv], self.environment())
        self.addCleanup(process.kill)
        return process

    def marker_when(self, run: WatchedProcess, accept, timeout: float = EVENT_TIMEOUT) -> nerve_trainer.Marker:
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline and run.process.poll() is None:
            seen = nerve_trainer.read_marker(self.marker_path)
            if seen is not None and accept(seen):
                return seen
            time.sleep(0.01)
        raise AssertionError(f"no such marker; last seen: {seen}; {run.name} said:\n{run.output()}")


@unittest.skipUnless(installed("torch"), "torch is not installed here")
class PlainPyTorchExample(FrameworkRun):
    def test_the_example_saves_with_dcp_on_sigterm_and_resumes_from_the_marked_step(self) -> None:
        script = HERE.parent.parent / "examples" / "plain_pytorch.py"
        torchrun = self.start(
            "torchrun",
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script,
             "--steps", "100000", "--save-every", "50"],
        )
        torchrun.wait_event("resumed", STARTUP_TIMEOUT, rank=1, step=0)
        periodic = self.marker_when(torchrun, lambda m: True)
        self.assertEqual((periodic.reason, periodic.path), (nerve_trainer.Reason.PERIODIC, f"step-{periodic.step}"))
        torchrun.send(signal.SIGTERM)
        torchrun.wait_exit(STARTUP_TIMEOUT)
        final = nerve_trainer.read_marker(self.marker_path)
        self.assertEqual(final.reason, nerve_trainer.Reason.NOTICE)
        self.assertTrue((self.checkpoints / final.path / ".metadata").exists(), "DCP's metadata is written before the marker")
        for rank in (0, 1):
            torchrun.wait_event("saved", rank=rank, step=final.step)

        resumed = self.start(
            "resumed",
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script,
             "--steps", final.step + 3],
        )
        for rank in (0, 1):
            self.assertEqual(resumed.wait_event("resumed", STARTUP_TIMEOUT, rank=rank)["step"], final.step)
            resumed.wait_event("finished", rank=rank, step=final.step + 3)
        self.assertEqual(resumed.wait_exit(), 0)


@unittest.skipUnless(installed("torch", "transformers"), "torch and transformers are not installed here")
class HuggingFaceTrainer(FrameworkRun):
    def test_notice_to_one_rank_then_sigterm_to_torchrun_save_agreed_steps_and_the_run_resumes(self) -> None:
        script = HERE / "hf_trainer.py"
        torchrun = self.start(
            "torchrun",
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script, "--save-steps", "10"],
        )
        ranks = [torchrun.wait_event("training", STARTUP_TIMEOUT, rank=r) for r in (0, 1)]

        periodic = self.marker_when(torchrun, lambda m: True)
        self.assertEqual(periodic.reason, nerve_trainer.Reason.PERIODIC)
        self.assertEqual(periodic.step % 10, 0)
        self.assertEqual(periodic.path, f"run/checkpoint-{periodic.step}")

        # The notice reaches one rank; both save the same step, after the rotation.
        os.kill(ranks[1]["pid"], signal.SIGUSR1)
        notice = self.marker_when(torchrun, lambda m: m.reason == nerve_trainer.Reason.NOTICE)
        self.assertEqual(notice.path, f"run/checkpoint-{notice.step}")
        for rank in (0, 1):
            torchrun.wait_event("saved", rank=rank, step=notice.step)
        on_disk = torchrun.wait_event("saved", rank=0, step=notice.step)
        self.assertEqual(on_disk["state_step"], notice.step, "trainer_state.json is written before the marker")
        self.assertEqual(on_disk["checkpoints"], [f"checkpoint-{notice.step}"], "save_total_limit=1 rotated the rest")

        # A drain: Kubernetes sends SIGTERM to the container's main process, torchrun, which
        # forwards it to the workers; they save once more, mark it, and exit.
        torchrun.send(signal.SIGTERM)
        torchrun.wait_exit(STARTUP_TIMEOUT)
        final = nerve_trainer.read_marker(self.marker_path)
        self.assertGreater(final.step, notice.step)
        self.assertEqual(final.reason, nerve_trainer.Reason.NOTICE)
        for rank in (0, 1):
            torchrun.wait_event("saved", rank=rank, step=final.step)
        self.assertEqual(torchrun.events_named("finished"), [], "the run ended at the SIGTERM save")
        self.assertEqual(sorted(p.name for p in (self.checkpoints / "run").glob("checkpoint-*")), [f"checkpoint-{final.step}"])

        resumed = self.start("resumed", [sys.executable, script, "--resume", "--max-steps", final.step + 2])
        self.assertEqual(resumed.wait_event("training", STARTUP_TIMEOUT)["step"], final.step)
        self.assertEqual(resumed.wait_event("finished")["step"], final.step + 2)
        self.assertEqual(resumed.wait_exit(), 0)


@unittest.skipUnless(installed("torch", "lightning"), "torch and lightning are not installed here")
class LightningTrainer(FrameworkRun):
    def test_notice_to_one_rank_then_sigterm_to_the_main_process_save_agreed_steps_and_the_run_resumes(self) -> None:
        script = HERE / "lightning_trainer.py"
        main = self.start("lightning", [sys.executable, script, "--devices", "2"])
        ranks = [main.wait_event("training", STARTUP_TIMEOUT, rank=r) for r in (0, 1)]

        periodic = self.marker_when(main, lambda m: True)
        self.assertEqual(periodic.reason, nerve_trainer.Reason.PERIODIC)
        self.assertEqual(periodic.step % 5, 0)
        self.assertTrue(periodic.path.startswith("checkpoints/"), periodic.path)

        os.kill(ranks[1]["pid"], signal.SIGUSR1)
        notice = self.marker_when(main, lambda m: m.reason == nerve_trainer.Reason.NOTICE)
        self.assertEqual(notice.path, "checkpoints/last-nerve.ckpt")

        # The drain's SIGTERM reaches the main process only (rank 0, the container's PID 1).
        main.send(signal.SIGTERM)
        self.assertEqual(main.wait_exit(STARTUP_TIMEOUT), nerve_trainer.TERMINATED_EXIT_CODE, main.output())
        final = nerve_trainer.read_marker(self.marker_path)
        self.assertGreater(final.step, notice.step)
        self.assertEqual((final.reason, final.path), (nerve_trainer.Reason.NOTICE, "checkpoints/last-nerve.ckpt"))
        self.assertEqual(main.events_named("finished"), [], "the run ended at the SIGTERM save")

        resumed = self.start("resumed", [sys.executable, script, "--devices", "1", "--resume", "--max-steps", final.step + 2])
        self.assertEqual(resumed.wait_event("training", STARTUP_TIMEOUT)["step"], final.step)
        self.assertEqual(resumed.wait_event("finished")["step"], final.step + 2)
        self.assertEqual(resumed.wait_exit(), 0)


if __name__ == "__main__":
    unittest.main()
