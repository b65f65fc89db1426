"""The options every ``neuralhead train`` command shares (neuralhead.training.cli_args)."""

from __future__ import annotations

import argparse
import json

from neuralhead.training import cli_args


def test_a_resumed_run_keeps_its_intervals_unless_told_otherwise(tmp_path):
    parser = argparse.ArgumentParser()
    cli_args.add_run_arguments(parser)
    fresh = cli_args.engine_options(parser.parse_args([]), 123)
    assert (fresh.max_steps, fresh.log_every, fresh.eval_every) == (123, 50, 1000)
    run = tmp_path / "run"
    run.mkdir()
    saved = {
        "max_steps": 9,
        "log_every": 7,
        "preview_every": 8,
        "eval_every": 5,
        "checkpoint_every": 4,
    }
    (run / "config.json").write_text(json.dumps({"engine": saved}))
    resumed = cli_args.engine_options(parser.parse_args(["--resume", str(run)]), 123)
    assert (resumed.max_steps, resumed.log_every, resumed.eval_every, resumed.checkpoint_every) == (
        9,
        7,
        5,
        4,
    )
    changed = cli_args.engine_options(
        parser.parse_args(["--resume", str(run), "--eval-every", "3"]), 123
    )
    assert changed.eval_every == 3 and changed.log_every == 7
