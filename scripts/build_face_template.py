"""Build the canonical face template shipped in neuralhead/tracking/data/face_template.npz.

The template is the tracker's 478-point mesh on scikit-image's public-domain astronaut
portrait, rotated to a frontal, upright orientation (eye line along +x, forehead-to-chin
along +y, face towards -z), made left-right symmetric, centred on the rigid points and
scaled so that the outer eye corners are one unit apart.

Run once; the result is committed so that every dataset measures pose and gaze against the
same reference:  python scripts/build_face_template.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import skimage.data
from scipy.optimize import linear_sum_assignment

from neuralhead.tracking import topology as T
from neuralhead.tracking.mediapipe_backend import FaceMeshTracker

OUT = Path(__file__).resolve().parents[1] / "src/neuralhead/tracking/data/face_template.npz"

PAIRS = [(33, 263), (133, 362), (61, 291), (234, 454), (127, 356), (98, 327), (70, 300)]


def frontal_frame(points: np.ndarray) -> np.ndarray:
    """Rows are the face's x (right on screen), y (down) and z (away) axes."""
    x = np.mean([points[b] - points[a] for a, b in PAIRS], axis=0)
    x /= np.linalg.norm(x)
    y = points[T.CHIN] - points[T.FOREHEAD]
    y -= x * (y @ x)
    y /= np.linalg.norm(y)
    z = np.cross(x, y)
    return np.stack([x, y, z])


def main() -> None:
    image = skimage.data.astronaut()
    with FaceMeshTracker(static=True) as tracker:
        points = tracker.process(image)
    if points is None:
        raise SystemExit("no face found in the astronaut image")
    points = points.astype(np.float64)
    points = points @ frontal_frame(points).T
    mirrored = points * np.array([-1.0, 1.0, 1.0])
    cost = ((points[:, None, :] - mirrored[None, :, :]) ** 2).sum(-1)
    rows, mirror = linear_sum_assignment(cost)
    mirror = mirror[np.argsort(rows)]
    assert mirror[T.RIGHT_IRIS_CENTER] == T.LEFT_IRIS_CENTER
    symmetric = 0.5 * (points + mirrored[mirror])
    symmetric -= symmetric[list(T.RIGID)].mean(0)
    symmetric /= np.linalg.norm(symmetric[263] - symmetric[33])
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez(OUT, vertices=symmetric.astype(np.float32), mirror=mirror.astype(np.int64))
    print(f"wrote {OUT}: {len(symmetric)} points, midline points {(mirror == np.arange(len(mirror))).sum()}")


if __name__ == "__main__":
    main()
