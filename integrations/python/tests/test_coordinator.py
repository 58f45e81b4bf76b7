"""The core with real processes and real signals: several ranks as processes, a notice signal or
SIGTERM sent to one of them, the agreement through torch.distributed's gloo backend when torch is
importable and through the tests' file stand-in otherwise.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path
from typing import Dict, List, Optional

import nerve_trainer
from watched_process import EVENT_TIMEOUT, STARTUP_TIMEOUT, WatchedProcess

HERE = Path(__file__).resolve().parent
RANK_TRAINER = HERE / "rank_trainer.py"
HAVE_TORCH = importlib.util.find_spec("torch") is not None



class Job:
    """Ranks spread over nodes; each node has its own checkpoint directory (node-local disks)."""

    def __init__(self, test: unittest.TestCase, nodes: List[int], backend: str = "file", extra: Optional[List[str]] = None):
        self.work = Path(tempfile.mkdtemp(prefix="nerve-trainer-test-"))
        test.addCleanup(self._remove_work)
        self.store = self.work / "store"
        self.store.mkdir()
        self.node_dirs = []
        self.ranks: List[WatchedProcess] = []
        world_size = sum(nodes)
        rank = 0
        for node, processes in enumerate(nodes):
            node_dir = self.work / f"node-{node}"
            node_dir.mkdir()
            self.node_dirs.append(node_dir)
            for local_rank in range(processes):
                env = nerve_free_environment()
                env["NERVE_CHECKPOINT_DIR"] = str(node_dir)
                env["LOCAL_RANK"] = str(local_rank)
                args = [
                    "--rank", str(rank),
                    "--world-size", str(world_size),
                    "--local-rank", str(local_rank),
                    "--store", str(self.store),
                    "--backend", backend,
                    *(extra or []),
                ]
                process = WatchedProcess(f"rank {rank}", [sys.executable, str(RANK_TRAINER), *args], env)
                test.addCleanup(process.kill)
                self.ranks.append(process)
                rank += 1
        for process in self.ranks:
            process.wait_event("started", STARTUP_TIMEOUT)

    def marker(self, node: int) -> nerve_trainer.Marker:
        found = nerve_trainer.read_marker(self.node_dirs[node] / ".nerve-done")
        assert found is not None, f"no marker in node {node}'s directory"
        return found

    def _remove_work(self) -> None:
        subprocess.run(["rm", "-rf", str(self.work)], check=False)


def nerve_free_environment() -> Dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("NERVE_")}


class AgreementAcrossRanks(unittest.TestCase):
    backend = "file"

    def test_every_rank_saves_the_step_agreed_after_one_rank_hears_the_notice(self) -> None:
        # Two nodes: two processes on the first (one marker writer), one on the second.
        job = Job(self, nodes=[2, 1], backend=self.backend, extra=["--steps-after-notice-save", "3"])
        job.ranks[2].send(signal.SIGUSR1)
        saves = [rank.wait_event("saved") for rank in job.ranks]
        steps = {event["step"] for event in saves}
        self.assertEqual(len(steps), 1, f"ranks saved different steps: {saves}")
        (step,) = steps
        for rank in job.ranks:
            self.assertEqual(rank.wait_exit(), 0, rank.output())
            self.assertEqual(len(rank.events_named("saved")), 1, "one notice, one save")
        first, second = job.marker(0), job.marker(1)
        self.assertEqual((first.step, first.reason, first.rank, first.path), (step, nerve_trainer.Reason.NOTICE, 0, f"checkpoint-{step}"))
        self.assertEqual((second.step, second.reason, second.rank), (step, nerve_trainer.Reason.NOTICE, 2))
        # Only the node-local rank 0 writes the node's marker.
        self.assertIsNone(saves[1]["marker"])
        self.assertIsNotNone(saves[0]["marker"])
        # Every rank's files of that step are in its node's directory.
        self.assertEqual(
            sorted(p.name for p in (job.node_dirs[0] / f"checkpoint-{step}").iterdir()),
            ["model-rank0.bin", "model-rank1.bin", "optimizer-rank0.bin", "optimizer-rank1.bin"],
        )

    def test_sigterm_to_one_rank_saves_on_every_rank_then_all_exit_with_the_terminated_status(self) -> None:
        job = Job(self, nodes=[1, 1, 1], backend=self.backend)
        job.ranks[1].send(signal.SIGTERM)
        codes = [rank.wait_exit() for rank in job.ranks]
        self.assertEqual(codes, [nerve_trainer.TERMINATED_EXIT_CODE] * 3, "\n\n".join(r.output() for r in job.ranks))
        steps = {rank.wait_event("saved")["step"] for rank in job.ranks}
        self.assertEqual(len(steps), 1, "every rank saves the same step")
        (step,) = steps
        for node in range(3):
            marker = job.marker(node)
            self.assertEqual((marker.step, marker.reason), (step, nerve_trainer.Reason.NOTICE))

    def test_sigterm_during_a_save_is_answered_by_that_save_and_no_second_one_is_taken(self) -> None:
        # The notice's save takes about a second (0.5 s before each of two files); SIGTERM lands
        # in the middle of it, on one rank only.
        job = Job(self, nodes=[1, 1], backend=self.backend, extra=["--file-pause", "0.5"])
        job.ranks[0].send(signal.SIGUSR1)
        saving = job.ranks[1].wait_event("saving")
        time.sleep(0.3)
        job.ranks[1].send(signal.SIGTERM)
        for rank in job.ranks:
            self.assertEqual(rank.wait_exit(), nerve_trainer.TERMINATED_EXIT_CODE, rank.output())
            self.assertEqual([e["step"] for e in rank.events_named("saved")], [saving["step"]])
        for node in range(2):
            self.assertEqual(job.marker(node).step, saving["step"])


@unittest.skipUnless(HAVE_TORCH, "torch is not importable here; the file stand-in covers the agreement")
class AgreementThroughTorchGloo(AgreementAcrossRanks):
    backend = "gloo"


class OneProcess(unittest.TestCase):
    def setUp(self) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="nerve-trainer-test-"))
        self.addCleanup(subprocess.run, ["rm", "-rf", str(self.work)], check=False)

    def start(self, env: Dict[str, str], *extra: str) -> WatchedProcess:
        argv = [sys.executable, str(RANK_TRAINER), "--store", str(self.work / "store"), *extra]
        process = WatchedProcess("trainer", argv, env)
        self.addCleanup(process.kill)
        process.wait_event("started", STARTUP_TIMEOUT)
        return process

    def test_without_nerve_settings_every_call_is_a_no_op_and_sigterm_keeps_its_default(self) -> None:
        trainer = self.start(nerve_free_environment(), "--save-every", "5")
        self.assertFalse(trainer.wait_event("started")["active"])
        saved = trainer.wait_event("saved")
        self.assertIsNone(saved["marker"])
        trainer.send(signal.SIGTERM)
        self.assertEqual(trainer.wait_exit(), -signal.SIGTERM, "no handler installed outside Nerve")
        self.assertIn("not running under Nerve", trainer.output())
        self.assertEqual(trainer.output().count("not running under Nerve"), 1)

    def test_a_periodic_save_gets_a_periodic_marker_and_a_notice_a_notice_marker(self) -> None:
        env = nerve_free_environment()
        env["NERVE_CHECKPOINT_DIR"] = str(self.work / "ckpt")
        env["NERVE_DONE_MARKER"] = "markers/done"
        trainer = self.start(env, "--save-every", "20")
        periodic = trainer.wait_event("saved")
        marker = nerve_trainer.read_marker(self.work / "ckpt" / "markers" / "done")
        self.assertIsNotNone(marker)
        self.assertEqual(marker.reason, nerve_trainer.Reason.PERIODIC)
        self.assertEqual(marker.step, periodic["step"])
        trainer.send(signal.SIGUSR1)
        deadline = time.monotonic() + EVENT_TIMEOUT
        while time.monotonic() < deadline:
            marker = nerve_trainer.read_marker(self.work / "ckpt" / "markers" / "done")
            if marker.reason == nerve_trainer.Reason.NOTICE:
                break
            time.sleep(0.01)
        self.assertEqual(marker.reason, nerve_trainer.Reason.NOTICE)
        self.assertEqual(marker.path, f"checkpoint-{marker.step}")
        self.assertIsNone(trainer.process.poll(), "a notice does not end the run")

    def test_a_notice_signal_soon_after_a_notice_save_is_answered_by_it_and_sigterm_is_not(self) -> None:
        env = nerve_free_environment()
        env["NERVE_CHECKPOINT_DIR"] = str(self.work / "ckpt")
        trainer = self.start(env)
        trainer.send(signal.SIGUSR1)
        first = trainer.wait_event("saved")
        # The same notice, as another pod's sidecar delivers it after the ranks agreed.
        trainer.send(signal.SIGUSR1)
        time.sleep(1.0)
        self.assertEqual(len(trainer.events_named("saved")), 1, "no second save for the same notice")
        trainer.send(signal.SIGTERM)
        self.assertEqual(trainer.wait_exit(), nerve_trainer.TERMINATED_EXIT_CODE)
        saves = trainer.events_named("saved")
        self.assertEqual(len(saves), 2, "SIGTERM still saves, then ends the run")
        self.assertGreater(saves[1]["step"], first["step"])

    def test_the_signal_named_by_nerve_signal_is_the_notice_signal(self) -> None:
        env = nerve_free_environment()
        env["NERVE_CHECKPOINT_DIR"] = str(self.work / "ckpt")
        env["NERVE_SIGNAL"] = "usr2"
        trainer = self.start(env)
        trainer.send(signal.SIGUSR2)
        self.assertEqual(trainer.wait_event("saved")["step"], trainer.wait_event("saving")["step"])
        self.assertEqual(nerve_trainer.read_marker(self.work / "ckpt" / ".nerve-done").reason, nerve_trainer.Reason.NOTICE)


if __name__ == "__main__":
    unittest.main()
