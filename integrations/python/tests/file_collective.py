"""A stand-in for torch.distributed in the tests: an element-wise MAX all-reduce through files in
a directory every rank shares, for machines without torch. Real processes, real blocking: a rank
returns only once every rank has offered its values for the same round.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import List, Sequence

# How often a rank looks for the others' offers: small against the tests' 10 ms steps.
POLL_INTERVAL = 0.002
# A rank that waits this long for the others is stuck (a rank skipped a round): fail loudly
# instead of hanging the test.
ROUND_TIMEOUT = 60.0


class FileCollective:
    def __init__(self, store: Path, rank: int, world_size: int, local_rank: int) -> None:
        self.store = store
        self.rank = rank
        self.local_rank = local_rank
        self.world_size = world_size
        self._round = 0
        store.mkdir(parents=True, exist_ok=True)

    def all_reduce_max(self, values: Sequence[int]) -> List[int]:
        self._round += 1
        offer = self.store / f"round-{self._round}.rank-{self.rank}"
        temporary = offer.with_name(offer.name + ".tmp")
        temporary.write_text(json.dumps(list(values)))
        os.replace(temporary, offer)
        deadline = time.monotonic() + ROUND_TIMEOUT
        while True:
            offers = [self.store / f"round-{self._round}.rank-{r}" for r in range(self.world_size)]
            if all(path.exists() for path in offers):
                break
            if time.monotonic() > deadline:
                missing = [str(p.name) for p in offers if not p.exists()]
                raise TimeoutError(f"rank {self.rank}: round {self._round} never completed; missing {missing}")
            time.sleep(POLL_INTERVAL)
        columns = zip(*(json.loads(path.read_text()) for path in offers))
        return [max(column) for column in columns]
