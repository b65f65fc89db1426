"""The training engine: data order, checkpoints, exact resumption, DDP, run directories, signals.

The end-to-end tests run ``neuralhead train dnp`` in subprocesses on the tiny fake dataset with
the ``dnp-test`` preset, single-threaded so that results are bit-for-bit reproducible.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_data import make_dataset
from safetensors.torch import load_file
from torch import nn

from neuralhead import cli
from neuralhead.training import checkpoint as ckpt
from neuralhead.training.engine import Engine, EngineOptions
from neuralhead.training.sampler import StepSampler

TESTS = Path(__file__).parent
MAX_STEPS = 64
# Every artefact of a run (logs, evaluations, previews, pruned checkpoints) within MAX_STEPS.
CADENCE = [
    "--checkpoint-every", "8", "--log-every", "8", "--preview-every", "32", "--eval-every", "32",
]  # fmt: skip
COMMON = ["--preset", "dnp-test", "--device", "cpu", "--no-progress", *CADENCE]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _command(*args: object) -> list[str]:
    return [sys.executable, "-m", "neuralhead", "train", "dnp", *map(str, args)]


def _train(*args: object, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        _command(*args), check=False, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


def _latest_step(run: Path) -> int:
    path = ckpt.latest_checkpoint(run / "checkpoints")
    assert path is not None, f"{run} has no checkpoint"
    return json.loads((path / "state.json").read_text())["step"]


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / ckpt.checkpoint_name(step) / "modules.safetensors")


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == [], f"weights differ: {different}"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("engine") / "data")


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory) -> Path:
    """An uninterrupted run of MAX_STEPS steps, seed 3."""
    run = tmp_path_factory.mktemp("reference") / "run"
    _train(data, "--run-dir", run, "--max-steps", MAX_STEPS, "--seed", 3, *COMMON)
    return run


# ------------------------------------------------------------------ StepSampler
def test_sampler_is_deterministic_and_seeded():
    a = StepSampler(list(range(50)), 4, seed=1)
    b = StepSampler(list(range(50)), 4, seed=1)
    c = StepSampler(list(range(50)), 4, seed=2)
    steps = [0, 7, 13, 12, 30, 3]  # any order: a batch only depends on its step
    assert [a.batch(s) for s in steps] == [b.batch(s) for s in reversed(steps)][::-1]
    assert [a.batch(s) for s in range(12)] != [c.batch(s) for s in range(12)]


def test_sampler_epochs_are_permutations():
    indices = [3, 8, 9, 11, 20, 21, 40]  # not 0..n-1: the sampler returns these values
    sampler = StepSampler(indices, 3, seed=0)
    stream = [i for s in range(14) for i in sampler.batch(s)]  # 42 samples = 6 epochs
    epochs = [stream[e * 7 : (e + 1) * 7] for e in range(6)]
    for epoch in epochs:
        assert sorted(epoch) == indices
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled every epoch


def test_sampler_ranks_partition_the_global_batch():
    world, per_rank = 3, 2
    whole = StepSampler(list(range(30)), per_rank * world, seed=4)
    ranks = [
        StepSampler(list(range(30)), per_rank, seed=4, rank=r, world_size=world)
        for r in range(world)
    ]
    for step in range(12):
        parts = [r.batch(step) for r in ranks]
        assert all(len(p) == per_rank for p in parts)
        assert sorted(i for p in parts for i in p) == sorted(whole.batch(step))
        if step < 5:  # inside the first epoch no sample can repeat
            assert len({i for p in parts for i in p}) == per_rank * world


def test_sampler_batch_is_the_step_th_item_of_iterate():
    sampler = StepSampler(list(range(10)), 4, seed=0, rank=1, world_size=2)
    it = sampler.iterate(0)
    batches = [next(it) for _ in range(25)]
    assert batches == [sampler.batch(s) for s in range(25)]
    later = sampler.iterate(17)
    assert [next(later) for _ in range(3)] == batches[17:20]


def test_sampler_rejects_an_empty_set():
    with pytest.raises(ValueError, match="no samples"):
        StepSampler([], 4, seed=0)


# ------------------------------------------------------------------ checkpoints
class _ToyTask:
    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-2)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1 / (1 + s))

    def modules(self):
        return {"net": self.net}

    def optimizers(self):
        return {"adam": self.opt}

    def schedulers(self):
        return {"lr": self.sched}

    def train_step(self, step: int) -> dict[str, float]:
        x = torch.randn(16, 4)  # noise from the global generator, as augmentations would draw
        loss = self.net(x).pow(2).mean() + float(np.random.rand()) + random.random()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.sched.step()
        return {"loss": float(loss.detach())}


def _engine(run_dir: Path, **options) -> Engine:
    return Engine(run_dir, EngineOptions(progress=False, **options))


def _draws() -> list:
    return [
        torch.rand(4).tolist(),
        torch.randn(3).tolist(),
        np.random.rand(3).tolist(),
        np.random.standard_normal(3).tolist(),
        random.random(),
        random.gauss(0, 1),
    ]


def _same_state(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):  # JSON has no tuples: Adam's betas come back as a list
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    return a == b


def test_checkpoint_round_trip_restores_everything(tmp_path):
    engine = _engine(tmp_path)
    a = _ToyTask(0)
    for step in range(3):
        a.train_step(step)
    # Leave cached Gaussians in NumPy's and Python's generators: they are state too.
    np.random.standard_normal(1)
    random.gauss(0, 1)
    engine.save_checkpoint(a, 3)
    saved = copy.deepcopy(
        {"w": a.net.state_dict(), "opt": a.opt.state_dict(), "sched": a.sched.state_dict()}
    )
    draws = _draws()
    a.train_step(3)

    b = _ToyTask(1)
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    assert engine.load_latest(b) == 3
    assert _same_state(b.net.state_dict(), saved["w"])
    assert _same_state(b.opt.state_dict(), saved["opt"])
    assert b.opt.state_dict()["state"][0]["exp_avg"].abs().sum() > 0
    assert _same_state(b.sched.state_dict(), saved["sched"])
    assert b.sched.get_last_lr() == [1e-2 / 4]
    assert _draws() == draws
    b.train_step(3)
    assert _same_state(b.net.state_dict(), a.net.state_dict())
    assert _same_state(b.opt.state_dict(), a.opt.state_dict())


def test_latest_points_at_the_newest_and_old_ones_are_pruned(tmp_path):
    engine = _engine(tmp_path, keep_checkpoints=2)
    task = _ToyTask(0)
    root = tmp_path / "checkpoints"
    assert ckpt.latest_checkpoint(root) is None
    for step in (1, 2, 3, 4):
        task.train_step(step)
        engine.save_checkpoint(task, step)
        assert ckpt.latest_checkpoint(root) == root / ckpt.checkpoint_name(step)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003", "step_00000004"]
    assert (root / "latest").read_text().strip() == "step_00000004"


def test_a_crash_mid_write_leaves_the_previous_checkpoint(tmp_path):
    engine = _engine(tmp_path)
    task = _ToyTask(0)
    engine.save_checkpoint(task, 4)
    root = tmp_path / "checkpoints"
    # What a process killed while writing step 8 leaves behind: a torn temporary directory.
    torn = root / "step_00000008.tmp"
    torn.mkdir()
    (torn / "modules.safetensors").write_bytes(b"\x00" * 10)
    (torn / "state.json").write_text('{"step": 8}')
    assert ckpt.latest_checkpoint(root) == root / "step_00000004"
    resumed = _ToyTask(1)
    assert engine.load_latest(resumed) == 4
    assert _same_state(resumed.net.state_dict(), task.net.state_dict())
    engine.save_checkpoint(task, 5)
    assert not torn.exists()
    assert not list(root.glob("*.tmp"))
    assert ckpt.latest_checkpoint(root) == root / "step_00000005"


def test_checkpoints_are_never_pickled(tmp_path, monkeypatch):
    engine = _engine(tmp_path)
    task = _ToyTask(0)
    task.train_step(0)
    engine.save_checkpoint(task, 1)
    files = [p for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()]
    names = sorted(p.relative_to(tmp_path / "checkpoints").as_posix() for p in files)
    assert names == [
        "latest",
        "step_00000001/modules.safetensors",
        "step_00000001/optimizers.safetensors",
        "step_00000001/rng_rank0.json",
        "step_00000001/rng_rank0.safetensors",
        "step_00000001/state.json",
    ]
    for path in files:
        head = path.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", (
            f"{path} looks like a pickle / torch.save file"
        )
        if path.suffix == ".json":
            json.loads(path.read_text())

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint must load without unpickling")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert engine.load_latest(_ToyTask(1)) == 1


# ------------------------------------------------------------------ exact resumption (CLI)
@pytest.mark.slow
def test_resume_after_stopping_is_bit_identical(data, reference_run, tmp_path):
    run = tmp_path / "run"
    _train(data, "--run-dir", run, "--max-steps", 16, "--seed", 3, *COMMON)
    assert _latest_step(run) == 16
    # Resumed without repeating --seed: the run keeps its own data order.
    _train("--resume", run, "--max-steps", MAX_STEPS, *COMMON)
    assert "resumed from step_00000016 (step 16)" in (run / "log.txt").read_text()
    _assert_same_weights(_weights(run, MAX_STEPS), _weights(reference_run, MAX_STEPS))
    # ... and the run really trained: its weights moved in the last 16 steps.
    earlier = _weights(run, MAX_STEPS - 16)
    assert any(not torch.equal(earlier[k], v) for k, v in _weights(run, MAX_STEPS).items())


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(data, reference_run, tmp_path):
    run = tmp_path / "run"
    # A preview and an evaluation after every step slow the run down enough for the kill to
    # land mid-run; they must not change the weights (the reference makes them every 32).
    slow = ["--preview-every", 1, "--eval-every", 1]
    proc = subprocess.Popen(
        _command(data, "--run-dir", run, "--max-steps", MAX_STEPS, "--seed", 3, *COMMON, *slow),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "latest").exists():
            assert proc.poll() is None, "training ended before writing a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.001)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = _latest_step(run)
    assert proc.returncode == -signal.SIGKILL
    assert killed_at < MAX_STEPS, "the run finished before it could be killed"
    assert not (run / "export").exists()
    # A checkpoint torn by the kill must not be picked up, and is cleaned away.
    torn = run / "checkpoints" / f"{ckpt.checkpoint_name(killed_at + 8)}.tmp"
    torn.mkdir(exist_ok=True)
    (torn / "modules.safetensors").write_bytes(b"torn")
    _train("--resume", run, *COMMON)  # --max-steps comes from the run's config.json
    assert f"resumed from {ckpt.checkpoint_name(killed_at)}" in (run / "log.txt").read_text()
    assert not list((run / "checkpoints").glob("*.tmp"))
    _assert_same_weights(_weights(run, MAX_STEPS), _weights(reference_run, MAX_STEPS))


class _SignalledTask(_ToyTask):
    """Receives ``sig`` in the middle of step ``at``."""

    def __init__(self, seed: int, sig: int | None = None, at: int = -1) -> None:
        super().__init__(seed)
        self.sig, self.at, self.finished = sig, at, False

    def train_step(self, step: int) -> dict[str, float]:
        if step == self.at:
            os.kill(os.getpid(), self.sig)
        return super().train_step(step)

    def evaluate(self, step: int) -> dict[str, float]:
        return {}

    def preview(self, step: int) -> None:
        return None

    def finish(self, run_dir: Path) -> None:
        self.finished = True


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_engine_checkpoints_and_stops_on_a_signal(tmp_path, sig):
    previous = signal.getsignal(sig)
    options = {
        "max_steps": 10,
        "log_every": 1,
        "checkpoint_every": 100,
        "eval_every": 0,
        "preview_every": 0,
    }
    engine = _engine(tmp_path, **options)
    engine.prepare_run_dir({"toy": True}, resume=False)
    task = _SignalledTask(0, sig, at=3)
    assert engine.fit(task) == 4  # step 3 completes, then the loop stops
    assert signal.getsignal(sig) is previous
    assert _latest_step(tmp_path) == 4 and not task.finished
    assert "interrupted at step 4; resume with --resume" in (tmp_path / "log.txt").read_text()

    resumed = _SignalledTask(1)
    engine = _engine(tmp_path, **options)
    engine.prepare_run_dir({"toy": True}, resume=True)
    assert engine.load_latest(resumed) == 4
    assert _same_state(resumed.net.state_dict(), task.net.state_dict())
    assert engine.fit(resumed, 4) == 10
    assert resumed.finished and _latest_step(tmp_path) == 10


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_resume_continues(data, tmp_path):
    run = tmp_path / "run"
    args = ["--preset", "dnp-test", "--device", "cpu", "--no-progress", "--log-every", 1,
            "--checkpoint-every", 100000, "--preview-every", 100000, "--eval-every", 100000]  # fmt: skip
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as stderr_file:
        proc = subprocess.Popen(
            _command(data, "--run-dir", run, "--max-steps", 1_000_000, *args),
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr_file,
        )
    try:
        stats = run / "stats.jsonl"
        deadline = time.monotonic() + 120
        while not (stats.exists() and stats.read_text().strip()):  # the loop is running
            assert proc.poll() is None, stderr_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "training did not start within 120 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = stderr_path.read_text()
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    step = _latest_step(run)
    assert 0 < step < 100000  # only the signal can have made this checkpoint
    assert f"interrupted at step {step}; resume with --resume" in (run / "log.txt").read_text()
    assert not (run / "export").exists()  # an interrupted run is not finished

    _train("--resume", run, "--max-steps", step + 2, *args)
    assert _latest_step(run) == step + 2
    assert (
        f"resumed from {ckpt.checkpoint_name(step)} (step {step})" in (run / "log.txt").read_text()
    )
    assert (run / "export" / "model.safetensors").is_file()


# ------------------------------------------------------------------ run directory
@pytest.mark.slow
def test_run_directory_contents(reference_run):
    run = reference_run
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "dnp" and config["world_size"] == 1
    assert config["engine"]["max_steps"] == MAX_STEPS and config["engine"]["seed"] == 3
    assert config["train"]["preset"] == "dnp-test"
    assert (
        config["model_config"]["image_size"] == 32 and config["model_config"]["num_latents"] == 36
    )

    log = (run / "log.txt").read_text()
    assert f"step {MAX_STEPS} " in log and f"checkpoint saved at step {MAX_STEPS}" in log

    records = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(8, MAX_STEPS + 1, 8))
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in train)
    assert all(
        {"loss_rec", "loss_rec_lowres", "psnr", "lr", "sec_per_step"} <= r.keys() for r in train
    )
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [32, 64] and all("heldout_psnr" in r for r in evals)

    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    previews = sorted(p.name for p in (run / "previews").glob("*.png"))
    assert previews == ["latest.png", "step_00000032.png", "step_00000064.png"]
    import cv2

    sheet = cv2.imread(str(run / "previews" / "latest.png"))
    assert sheet is not None and sheet.ndim == 3 and min(sheet.shape[:2]) >= 32

    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["latest", "step_00000048", "step_00000056", "step_00000064"]  # keep 3
    assert (run / "export" / "model.safetensors").is_file()
    assert (run / "export" / "portrait.npz").is_file()


@pytest.mark.slow
def test_new_run_in_a_non_empty_directory_is_refused(data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("keep me")
    proc = _train(data, "--run-dir", run, "--max-steps", 2, *COMMON, expect=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: run directory"), proc.stderr
    assert "--resume" in lines[0] and "Traceback" not in proc.stderr
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_resume_of_a_directory_that_is_no_run_is_refused(tmp_path, capsys):
    assert cli.main(["train", "dnp", "--resume", str(tmp_path), "--no-progress"]) == 2
    assert capsys.readouterr().err == f"error: cannot resume: {tmp_path} has no config.json\n"


# ------------------------------------------------------------------ DDP (two CPU processes, gloo)
def _digest(weights: dict[str, torch.Tensor]) -> str:
    """Engine.replica_digests computed from a checkpoint's ``model.*`` tensors."""
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name[len("model.") :].encode())
        h.update(weights[name].contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["dnp-test", "dnp-test-audio"])
def test_ddp_replicas_stay_identical(data, tmp_path, preset):
    run, out = tmp_path / "run", tmp_path / "ranks"
    out.mkdir()
    steps = 6  # the audio preset switches its attention filter on at step 4
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(TESTS / "ddp_train.py"), "train", "dnp", str(data), "--run-dir", str(run),
        "--preset", preset, "--max-steps", str(steps), "--batch-size", "2", "--device", "cpu",
        "--no-progress", "--checkpoint-every", "3", "--log-every", "2", "--preview-every", "3",
        "--eval-every", "3",
    ]  # fmt: skip
    env = {**_env(), "NEURALHEAD_TEST_OUT": str(out)}
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world_size"], r["step"]) for r in ranks] == [
        (0, 2, steps),
        (1, 2, steps),
    ]
    assert [r["ddp_alive"] for r in ranks] == [0, 0]  # nothing left to abort the exit
    # Every rank gathered the same two digests: the replicas hold identical weights ...
    assert ranks[0]["digests"] == ranks[1]["digests"]
    assert ranks[0]["digests"][0] == ranks[0]["digests"][1]
    # ... which are the weights of the final checkpoint ...
    final = _weights(run, steps)
    assert (
        _digest({k: v for k, v in final.items() if k.startswith("model.")})
        == ranks[0]["digests"][0]
    )
    # ... although each rank trained on its own share of every batch.
    frames = [r["frames"] for r in ranks]
    assert all(len(f) == steps and all(len(b) == 2 for b in f) for f in frames)
    seen = [{i for b in f for i in b} for f in frames]
    assert seen[0].isdisjoint(seen[1]) and len(seen[0] | seen[1]) == 2 * 2 * steps
    expected = StepSampler(list(range(36)), 4, seed=0)
    for step in range(steps):
        assert sorted(frames[0][step] + frames[1][step]) == sorted(expected.batch(step))
    assert all(math.isfinite(v) for r in ranks for v in r["losses"])
    assert ranks[0]["losses"] != ranks[1]["losses"]

    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2
    records = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6] and all(math.isfinite(r["loss"]) for r in train)
    files = {p.name for p in (run / "checkpoints" / ckpt.checkpoint_name(steps)).iterdir()}
    assert {"rng_rank0.safetensors", "rng_rank1.safetensors", "modules.safetensors"} <= files
    assert _latest_step(run) == steps
    if preset.endswith("-audio"):
        assert bool(final["model.audio_attention_active"])
