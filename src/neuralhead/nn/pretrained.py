"""Configs captured at construction, and save/load of a model as config.json + safetensors.

A model class declares ``config_class`` (a dataclass) and takes an instance as its only
constructor argument. ``save_pretrained(dir)`` writes ``config.json`` and
``model.safetensors`` (atomically); ``from_pretrained(dir)`` rebuilds the model from them.
Weights are only ever read with safetensors, never unpickled.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from safetensors.torch import load_file
from torch import nn

from neuralhead.errors import InputError
from neuralhead.fileio import save_safetensors_atomic, write_json_atomic

C = TypeVar("C")
M = TypeVar("M", bound="PretrainedModel")

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def config_to_dict(config: Any) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def config_from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Build a config dataclass, turning JSON lists back into tuples and rejecting unknown keys."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise InputError(f"unknown {cls.__name__} fields: {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, value in data.items():
        default = fields[name].default
        if isinstance(value, list) and (
            isinstance(default, tuple) or "tuple" in str(fields[name].type)
        ):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


class PretrainedModel(nn.Module):
    """Base class: a module with a dataclass config and safetensors persistence."""

    config_class: ClassVar[type]

    def __init__(self, config: Any) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}")
        self.config = config

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"model_class": type(self).__name__, **config_to_dict(self.config)}
        write_json_atomic(directory / CONFIG_FILE, payload)
        save_safetensors_atomic(self.state_dict(), directory / WEIGHTS_FILE)
        return directory

    @classmethod
    def from_pretrained(cls: type[M], directory: str | Path, map_location: str = "cpu") -> M:
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not config_path.is_file() or not weights_path.is_file():
            raise InputError(f"{directory} does not hold a saved model ({CONFIG_FILE} + {WEIGHTS_FILE})")
        data = json.loads(config_path.read_text())
        saved_class = data.pop("model_class", cls.__name__)
        if saved_class != cls.__name__:
            raise InputError(f"{directory} holds a {saved_class}, not a {cls.__name__}")
        model = cls(config_from_dict(cls.config_class, data))
        model.load_state_dict(load_file(weights_path, device=map_location))
        return model


def init_frozen_feature_network(network: nn.Module, **kaiming: Any) -> None:
    """He-initialise the convolutions of a pretrained feature network, then freeze it.

    Published weights replace these values; the initialisation matters for networks used
    untrained (tests, or a run without the file), where it keeps activations at a usable scale
    through dozens of layers. ``kaiming`` goes to :func:`torch.nn.init.kaiming_normal_`
    (default ``mode="fan_in", nonlinearity="relu"``). The network is left in eval mode with
    ``requires_grad`` off.
    """
    options = kaiming or {"mode": "fan_in", "nonlinearity": "relu"}
    for module in network.modules():
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            nn.init.kaiming_normal_(module.weight, **options)
    network.requires_grad_(False)
    network.eval()
