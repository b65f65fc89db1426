"""``reenact``: the one entry point the CLI and the web app call to drive a trained model.

The checkpoint's kind decides the pipeline; today that is a Dynamic Neural Portrait
(:mod:`neuralhead.dnp.pipeline`).
"""

from __future__ import annotations

import json
from pathlib import Path

from neuralhead.errors import InputError


def checkpoint_kind(path: str | Path) -> str:
    """The model family of a training run directory or a saved model directory."""
    path = Path(path)
    config = path / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        if data.get("model") == "dnp" or data.get("model_class") == "DynamicNeuralPortrait":
            return "dnp"
        kind = data.get("model") or data.get("model_class")
        raise InputError(f"{path} holds a model neuralhead cannot reenact ({kind})")
    if not path.exists():
        raise InputError(f"checkpoint {path} does not exist")
    raise InputError(f"{path} is not a training run or a saved model (no config.json)")


def reenact(checkpoint: str | Path, driving: str | Path, out: str | Path, **options):
    """Drive the model at ``checkpoint`` by ``driving``; write the video ``out``.

    Keyword options are those of the model's pipeline (for DNP:
    :class:`neuralhead.dnp.pipeline.ReenactOptions`).
    """
    kind = checkpoint_kind(checkpoint)
    if kind == "dnp":
        from neuralhead.dnp.pipeline import ReenactOptions
        from neuralhead.dnp.pipeline import reenact as reenact_dnp

        return reenact_dnp(checkpoint, driving, out, ReenactOptions(**options))
    raise InputError(f"no reenactment pipeline for {kind}")
