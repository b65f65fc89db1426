"""The canonical face template that head pose and gaze are measured against.

Built by ``scripts/build_face_template.py``: the tracker's mesh on a public-domain frontal
portrait, made upright, frontal and symmetric, centred on the rigid points and scaled so the
outer eye corners are one unit apart. Every dataset uses this same template, so that a yaw of
zero means "facing the camera" for every person and poses can be compared across videos.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

import numpy as np


@dataclass(frozen=True)
class FaceTemplate:
    vertices: np.ndarray  # (478, 3) float32, template units
    mirror: np.ndarray  # (478,) index of each point's left-right mirror image


@functools.lru_cache(maxsize=1)
def load_template() -> FaceTemplate:
    with resources.files("neuralhead.tracking").joinpath("data/face_template.npz").open("rb") as f:
        data = np.load(f, allow_pickle=False)
        return FaceTemplate(vertices=data["vertices"].copy(), mirror=data["mirror"].copy())
