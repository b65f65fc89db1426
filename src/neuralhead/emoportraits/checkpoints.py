"""Finding and loading the EMOPortraits models a user points at.

Each model is saved as ``config.json`` + ``model.safetensors``
(:class:`~neuralhead.nn.pretrained.PretrainedModel`); a finished training run keeps it in a
sub-directory named after the model. A path may be either the run directory or the saved
model's own directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from neuralhead.errors import InputError
from neuralhead.megaportraits.base_model import MegaPortraitsBase
from neuralhead.megaportraits.reenact import _saved_model_directory
from neuralhead.nn.pretrained import CONFIG_FILE, WEIGHTS_FILE, PretrainedModel

#: Sub-directory of a main-model run (``neuralhead train emoportraits``).
MAIN_SUBDIR = "emoportraits"
#: Sub-directory of a speech-encoder run (``neuralhead train emoportraits-speech``).
SPEECH_SUBDIR = "speech"
#: Sub-directory of a rotation-generator run (``neuralhead train emoportraits-rotation``).
ROTATION_SUBDIR = "rotation"


def saved_directory(
    path: str | os.PathLike, subdir: str, cls: type[PretrainedModel]
) -> Path | None:
    """``path/subdir`` or ``path`` when it holds a saved ``cls``; else None."""
    return _saved_model_directory(Path(path), subdir, cls.__name__)


def require_saved(path: str | os.PathLike, subdirs: tuple[str, ...], cls: type, what: str) -> Path:
    """The directory of a saved ``cls`` under ``path`` (one of ``subdirs`` or ``path`` itself),
    or an :class:`InputError` saying what was expected."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {path} does not exist")
    for subdir in subdirs:
        directory = saved_directory(path, subdir, cls)
        if directory is not None:
            if not (directory / WEIGHTS_FILE).is_file():
                raise InputError(f"{directory} has {CONFIG_FILE} but no {WEIGHTS_FILE}")
            return directory
    expected = " or ".join(f"{s}/{CONFIG_FILE}" for s in subdirs)
    raise InputError(
        f"{path} is not a {what}: expected {expected} (a finished training run) or the "
        f"{CONFIG_FILE} of a saved {cls.__name__}"
    )


def main_model_directory(path: str | os.PathLike) -> Path:
    """The saved main model of an EMOPortraits run (or a MegaPortraits run / saved model)."""
    return require_saved(
        path, (MAIN_SUBDIR, "megaportraits"), MegaPortraitsBase, "EMOPortraits checkpoint"
    )


def load_main_model(path: str | os.PathLike, *, map_location: str = "cpu") -> MegaPortraitsBase:
    """The EMOPortraits main model of a run (or a MegaPortraits base model: same classes)."""
    return MegaPortraitsBase.from_pretrained(main_model_directory(path), map_location=map_location)
