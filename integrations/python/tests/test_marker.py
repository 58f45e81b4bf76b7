"""The done marker, the settings the injector passes, `saved`'s refusals, and what importing the
package loads."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path
from typing import List, Sequence

import nerve_trainer
from nerve_trainer.marker import Marker, Reason, make_durable, read_marker, write_marker
from nerve_trainer.settings import DEFAULT_DONE_MARKER, Settings, SettingsError, parse_signal


class OtherRank:
    """A second rank that offers given values, one list per all-reduce round."""

    rank = 0
    local_rank = 0

    def __init__(self, *rounds: Sequence[int]) -> None:
        self.rounds = [list(offers) for offers in rounds]

    def all_reduce_max(self, values: Sequence[int]) -> List[int]:
        theirs = self.rounds.pop(0)
        return [max(mine, other) for mine, other in zip(values, theirs)]


class DoneMarker(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="nerve-marker-"))
        self.addCleanup(shutil.rmtree, self.dir)

    def test_the_marker_is_key_value_lines_the_sidecar_reads(self) -> None:
        marker = Marker(step=1055, reason=Reason.NOTICE, rank=0, path="checkpoint-1055")
        self.assertEqual(marker.render(), "step=1055\nreason=notice\nrank=0\npath=checkpoint-1055\n")
        self.assertEqual(Marker.parse(marker.render()), marker)
        self.assertEqual(Marker(step=3, reason=Reason.PERIODIC).render(), "step=3\nreason=periodic\n")

    def test_writing_a_marker_replaces_the_old_one_and_leaves_no_temporary_file(self) -> None:
        path = self.dir / ".nerve-done"
        write_marker(path, Marker(step=1, reason=Reason.PERIODIC))
        write_marker(path, Marker(step=2, reason=Reason.NOTICE))
        self.assertEqual(read_marker(path), Marker(step=2, reason=Reason.NOTICE))
        self.assertEqual([p.name for p in self.dir.iterdir()], [".nerve-done"])

    def test_durability_covers_every_file_of_a_checkpoint_directory_and_skips_links(self) -> None:
        checkpoint = self.dir / "run" / "checkpoint-7"
        (checkpoint / "shards").mkdir(parents=True)
        for name in ("trainer_state.json", "shards/0.bin", "shards/1.bin"):
            (checkpoint / name).write_bytes(b"x")
        (checkpoint / "link").symlink_to("/etc/hostname")
        self.assertEqual(make_durable(checkpoint, self.dir), 3)
        single = self.dir / "last.ckpt"
        single.write_bytes(b"y")
        self.assertEqual(make_durable(single, self.dir), 1)


class SettingsFromTheEnvironment(unittest.TestCase):
    def test_without_a_checkpoint_directory_there_are_no_settings(self) -> None:
        self.assertIsNone(Settings.resolve({}))
        self.assertIsNone(Settings.resolve({"NERVE_CHECKPOINT_DIR": ""}))

    def test_the_marker_defaults_inside_the_directory_and_may_be_relative_or_absolute(self) -> None:
        base = {"NERVE_CHECKPOINT_DIR": "/ckpt"}
        self.assertEqual(Settings.resolve(base).done_marker, Path("/ckpt") / DEFAULT_DONE_MARKER)
        self.assertEqual(Settings.resolve({**base, "NERVE_DONE_MARKER": "out/DONE"}).done_marker, Path("/ckpt/out/DONE"))
        self.assertEqual(Settings.resolve({**base, "NERVE_DONE_MARKER": "/run/DONE"}).done_marker, Path("/run/DONE"))

    def test_an_explicit_directory_wins_over_the_environment(self) -> None:
        settings = Settings.resolve({"NERVE_CHECKPOINT_DIR": "/ckpt"}, checkpoint_dir="/mine")
        self.assertEqual(settings.checkpoint_dir, Path("/mine"))

    def test_signals_are_named_as_the_sidecar_names_them(self) -> None:
        self.assertEqual(parse_signal("SIGUSR1"), signal.SIGUSR1)
        self.assertEqual(parse_signal("usr2"), signal.SIGUSR2)
        self.assertEqual(parse_signal("15"), signal.SIGTERM)
        with self.assertRaisesRegex(SettingsError, "NERVE_SIGNAL='SIGWHAT' is not a signal name"):
            parse_signal("SIGWHAT")
        with self.assertRaisesRegex(SettingsError, "cannot be handled"):
            parse_signal("SIGKILL")


class SavedRefuses(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="nerve-saved-"))
        self.addCleanup(shutil.rmtree, self.dir)

    def coordinator(self, collective) -> nerve_trainer.SaveCoordinator:
        return nerve_trainer.SaveCoordinator(Settings.resolve({}, checkpoint_dir=self.dir), collective=collective)

    def test_a_checkpoint_outside_the_uploaded_directory_is_refused_with_the_fix(self) -> None:
        outside = Path(tempfile.mkdtemp(prefix="nerve-elsewhere-"))
        self.addCleanup(shutil.rmtree, outside)
        with self.assertRaisesRegex(nerve_trainer.CheckpointOutsideDirectory, "NERVE_CHECKPOINT_DIR.*save under it"):
            self.coordinator(nerve_trainer.SingleProcess()).saved(5, outside)
        self.assertIsNone(read_marker(self.dir / DEFAULT_DONE_MARKER))

    def test_ranks_that_saved_different_steps_get_no_marker(self) -> None:
        (self.dir / "checkpoint-9").mkdir()
        # The other rank saved step 10: the all-reduce of [step, -step, request] shows it.
        with self.assertRaisesRegex(nerve_trainer.StepDisagreement, "from 9 to 10"):
            self.coordinator(OtherRank([10, -10, 0])).saved(9, self.dir / "checkpoint-9")
        self.assertIsNone(read_marker(self.dir / DEFAULT_DONE_MARKER))

    def test_a_request_heard_by_another_rank_makes_every_rank_save(self) -> None:
        stop = int(nerve_trainer.Request.SAVE_AND_STOP)
        coordinator = self.coordinator(OtherRank([stop], [4, -4, 0]))
        self.assertTrue(coordinator.should_save(4))
        self.assertTrue(coordinator.should_save(4), "owed until saved")
        (self.dir / "checkpoint-4").mkdir()
        marker = coordinator.saved(4, self.dir / "checkpoint-4")
        self.assertEqual((marker.step, marker.reason, marker.path), (4, Reason.NOTICE, "checkpoint-4"))
        self.assertTrue(coordinator.should_stop())
        with self.assertRaises(SystemExit) as exit:
            coordinator.stop()
        self.assertEqual(exit.exception.code, 143)


class Package(unittest.TestCase):
    def test_importing_it_imports_no_framework_even_where_they_are_installed(self) -> None:
        loaded = subprocess.run(
            [sys.executable, "-c", "import sys, nerve_trainer; print(sorted({m.split('.')[0] for m in sys.modules}))"],
            capture_output=True, text=True, check=True,
        ).stdout
        for framework in ("torch", "transformers", "lightning", "numpy"):
            self.assertNotIn(f"'{framework}'", loaded)


if __name__ == "__main__":
    unittest.main()
