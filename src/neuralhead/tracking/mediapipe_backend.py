"""Face mesh, face detection and foreground segmentation on mediapipe's offline models.

mediapipe 0.10.21 is the last release whose wheel carries its face models and the
``solutions`` API; it runs here with numpy 2 / protobuf 6 although its metadata pins
older versions (scripts/setup.sh installs it without those pins).
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any

import numpy as np

from neuralhead.errors import NeuralheadError
from neuralhead.tracking.topology import NUM_LANDMARKS

# Quieten the C++ logging of mediapipe's graph runner before it is first imported.
os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_MEDIAPIPE_VERSION = "0.10.21"


def _import_mediapipe() -> Any:
    try:
        # With protobuf 6, mediapipe prints a harmless AttributeError from Python while importing.
        with contextlib.redirect_stderr(io.StringIO()):
            import mediapipe as mp
    except ImportError as exc:
        raise NeuralheadError(
            f"face tracking needs mediapipe=={_MEDIAPIPE_VERSION}: "
            f"run `pip install --no-deps mediapipe=={_MEDIAPIPE_VERSION}` ({exc})"
        ) from None
    return mp


@contextlib.contextmanager
def _silenced_stderr():
    """Redirect file descriptor 2 to /dev/null while mediapipe's native code runs.

    Its C++ code logs to descriptor 2 (TFLite's "Created TensorFlow Lite XNNPACK delegate",
    absl warnings), which GLOG_minloglevel does not reach: from its own threads while the
    graph starts, asynchronously after construction, and whenever a model first runs, which
    can be any frame (the landmark model first runs on the first frame with a face). So every
    native call is wrapped, and construction waits for the graph to go idle inside the
    redirection. Whatever another thread writes to stderr during a call is lost too.
    """
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)
        os.close(devnull)


def _start_quietly(build: Any) -> Any:
    """Build a mediapipe solution and let its graph finish starting, with stderr silenced.

    ``_graph`` is the solution's CalculatorGraph (mediapipe 0.10.21's SolutionBase).
    """
    with _silenced_stderr():
        solution = build()
        solution._graph.wait_until_idle()
    return solution


def tracker_version() -> str:
    """Identifies the landmark model, stored with every prepared dataset."""
    mp = _import_mediapipe()
    return f"mediapipe-{mp.__version__}/face_mesh-478"


class FaceMeshTracker:
    """Dense 478-point face landmarks (468 surface + 10 iris) for one face per frame.

    In video mode (``static=False``) mediapipe tracks the face from frame to frame and only
    re-runs its detector when tracking is lost, which is both faster and steadier.
    Landmarks are returned in pixels ``(478, 3)``: x right, y down, z away from the camera
    with the same scale as x (mediapipe's normalised z multiplied by the image width).
    """

    def __init__(self, static: bool = False, min_confidence: float = 0.5) -> None:
        mp = _import_mediapipe()
        self._mesh = _start_quietly(
            lambda: mp.solutions.face_mesh.FaceMesh(
                static_image_mode=static,
                max_num_faces=1,
                refine_landmarks=True,
                min_detection_confidence=min_confidence,
                min_tracking_confidence=min_confidence,
            )
        )

    def process(self, frame: np.ndarray) -> np.ndarray | None:
        """Landmarks of the face in an RGB uint8 frame, or None when there is no face."""
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 HxWx3 frame, got {frame.dtype} {frame.shape}")
        height, width = frame.shape[:2]
        with _silenced_stderr():
            result = self._mesh.process(np.ascontiguousarray(frame))
        if not result.multi_face_landmarks:
            return None
        marks = result.multi_face_landmarks[0].landmark
        points = np.array([(p.x, p.y, p.z) for p in marks], dtype=np.float32)
        if len(points) != NUM_LANDMARKS:
            raise NeuralheadError(f"face mesh returned {len(points)} points, expected {NUM_LANDMARKS}")
        points *= np.array([width, height, width], dtype=np.float32)
        return points

    def close(self) -> None:
        with _silenced_stderr():
            self._mesh.close()

    def __enter__(self) -> FaceMeshTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ForegroundSegmenter:
    """Soft foreground (person) mask in [0, 1] from mediapipe's selfie segmentation.

    ``model_selection=0`` is the 256x256 "general" model, which suits head-and-shoulders
    crops better than the landscape model.
    """

    def __init__(self) -> None:
        mp = _import_mediapipe()
        self._seg = _start_quietly(
            lambda: mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0)
        )

    def process(self, frame: np.ndarray) -> np.ndarray:
        with _silenced_stderr():
            result = self._seg.process(np.ascontiguousarray(frame))
        return np.clip(result.segmentation_mask, 0.0, 1.0).astype(np.float32)

    def close(self) -> None:
        with _silenced_stderr():
            self._seg.close()

    def __enter__(self) -> ForegroundSegmenter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
