"""Which model a checkpoint holds, and ``reenact`` for the person-specific DNP portraits.

:func:`checkpoint_family` tells the four families apart (a DNP portrait, a HeadGAN run, a
MegaPortraits run, an EMOPortraits run) for every caller that routes by model, such as the
command line; each family's pipeline lives with it (:mod:`neuralhead.dnp.pipeline`,
:mod:`neuralhead.headgan.reenact`, :mod:`neuralhead.megaportraits.reenact`,
:mod:`neuralhead.emoportraits.reenact`).
"""

from __future__ import annotations

import json
from pathlib import Path

from neuralhead.errors import InputError

#: The model families :func:`checkpoint_family` knows.
FAMILIES = ("dnp", "headgan", "megaportraits", "emoportraits")


def checkpoint_family(path: str | Path, *, speech: bool = False) -> str | None:
    """The family of a training run or saved model directory, or None if it is none of them.

    A MegaPortraits base model is also EMOPortraits' main model (the same classes): with
    ``speech`` (the caller drives it by audio) it counts as ``"emoportraits"``.
    """
    from neuralhead.emoportraits.checkpoints import MAIN_SUBDIR
    from neuralhead.headgan.reenact import is_headgan_checkpoint
    from neuralhead.megaportraits.reenact import is_megaportraits_checkpoint

    path = Path(path)
    if not path.is_dir():
        return None
    if is_headgan_checkpoint(path):
        return "headgan"
    if (path / MAIN_SUBDIR).is_dir():
        return "emoportraits"
    if is_megaportraits_checkpoint(path):
        return "emoportraits" if speech else "megaportraits"
    config = path / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        if data.get("model") == "dnp" or data.get("model_class") == "DynamicNeuralPortrait":
            return "dnp"
    return None


def checkpoint_kind(path: str | Path, *, speech: bool = False) -> str:
    """:func:`checkpoint_family`, with an :class:`InputError` saying why when there is none."""
    path = Path(path)
    family = checkpoint_family(path, speech=speech)
    if family is not None:
        return family
    if not path.exists():
        raise InputError(f"checkpoint {path} does not exist")
    config = path / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        kind = data.get("model") or data.get("model_class")
        raise InputError(f"{path} holds a model neuralhead cannot reenact ({kind})")
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
