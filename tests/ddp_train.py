"""``neuralhead`` run under torchrun by tests/test_training_engine.py, reporting each rank's view.

The command is the real CLI. Each rank also writes ``rank<r>.json`` into ``$NEURALHEAD_TEST_OUT``:
the frames it loaded and the loss it computed at every step, ``Engine.replica_digests`` of the
trained model (gathered right after ``Engine.fit``: the command destroys the process group when
it returns), and how many DistributedDataParallel modules are still alive once the command has
returned (none may be left for the interpreter's exit to tear down).
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

from torch.nn.parallel import DistributedDataParallel

from neuralhead.cli import main
from neuralhead.data.dataset import PortraitDataset
from neuralhead.dnp.trainer import DNPTask
from neuralhead.training.engine import Engine

record: dict = {"frames": [], "losses": []}

_batch, _train_step, _fit = PortraitDataset.batch, DNPTask.train_step, Engine.fit


def batch(self, positions):
    out = _batch(self, positions)
    record["frames"].append(out["index"].tolist())
    return out


def train_step(self, step):
    values = _train_step(self, step)
    record["losses"].append(values["loss"])
    return values


def fit(self, task, start_step=0):
    step = _fit(self, task, start_step)
    record.update(rank=self.rank, world_size=self.world_size, step=step)
    record["digests"] = self.replica_digests(task.modules()["model"])
    return step


PortraitDataset.batch, DNPTask.train_step, Engine.fit = batch, train_step, fit

if __name__ == "__main__":
    # Only what the command frees itself is freed: the collector's own timing varies from run
    # to run, and a replica it happens to leave for the interpreter's exit can abort the process.
    gc.disable()
    status = main(sys.argv[1:])
    record["ddp_alive"] = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    out = Path(os.environ["NEURALHEAD_TEST_OUT"])
    (out / f"rank{record['rank']}.json").write_text(json.dumps(record))
    raise SystemExit(status)
