"""HeadGAN's linear 3D morphable model of the face (Sec. 3.1, Eq. 1).

A face shape is ``s = mean + U_id p_id + U_exp p_exp`` (Eq. 1): a mean shape, an identity basis
that encodes the person's facial geometry and an expression basis that encodes deformations
from motion. The paper uses the bases of the LSFM model (Booth et al., its reference [7]) fitted
to about 1K dense points regressed by RetinaFace (Appendix A).

**What we ship, and why.** LSFM is released for non-commercial research on request and may not
be redistributed, so the models here are:

* :func:`template_face_model`: the tracker's canonical face (``tracking/data/face_template.npz``,
  its 468 surface points; the 10 iris points are left out because no triangle uses them and
  their motion is gaze, which no 3DMM basis here models) with the tracker's triangles
  (``data/face_mesh_triangles.npz``, derived from mediapipe's Apache-2.0 edge list by
  ``scripts/build_face_mesh_triangles.py``; see "Mesh" below). It has no bases (``K_id = K_exp = 0``): camera
  fitting and rendering of a mean face only.
* :func:`build_face_model`: identity and expression bases learned by PCA from prepared datasets
  (``canonical.npy``, landmarks with the head pose removed; docs/dataset.md). The identity basis
  is the PCA of the per-video mean shapes (one video per person is assumed; a person with several
  videos only adds noise), so it needs two or more videos and has at most ``videos - 1``
  components; the expression basis is the PCA of the within-video deviations from those means,
  projected off the identity space first so that the two bases are mutually orthogonal. Both are
  orthonormal (flattened to ``3V``), coefficients are in model units and each component's
  standard deviation over its data is stored for bounds and editing. Limits: the "3DMM" is only
  as good as the tracker's landmarks (468 points, noisy at the lips and eyelids), identity
  variation is as rich as the number of people seen, and with one video the identity basis is
  empty (the person's face shape then sits in the mean, and a reenactment keeps the driver's
  expression deformation on that mean shape).
* :func:`load_ict_facekit`: the ICT-FaceKit model (USC ICT, MIT licence; 100 identity and 53
  expression shapes on 26,719 vertices), which the user downloads. It is sampled at the 468
  tracker points through a vertex correspondence (below) and expressed in template space.

**Mesh.** Vertices are the tracker's 468 surface points, in template space (x right, y down,
z away from the camera, outer eye corners one unit apart; ``neuralhead.tracking.template``), so
the rotations of the camera follow :mod:`neuralhead.geometry.rotation`. Triangles: 852 surface
triangles with the eye and mouth openings as holes, plus 28 triangles closing the eyes and 18
closing the mouth. By default the eyes are closed (a 3DMM's eye region is a surface too) and the
mouth is left open, so that an open mouth shows as background in the render, as in 3DMMs whose
lips part (our choice; ``fill_eyes`` / ``fill_mouth``).

**NCC colours** (Sec. 4.1, after PNCC, Zhu et al. 2016): each vertex is coloured by the (x, y, z)
of the mean shape, min-max normalised per axis to [0, 1].

**ICT-FaceKit files and correspondence.** From the repository's ``FaceXModel/`` folder the loader
reads ``generic_neutral_mesh.obj`` (the neutral face), ``identity000.obj`` ... ``identity099.obj``
(the neutral face displaced by one identity mode each; ICT samples identity weights from a
standard normal) and the 53 expression blendshapes (``browDown_L.obj`` ... ``noseSneer_R.obj``,
ARKit-style, weights in [0, 1]) in the order of ``vertex_indices.json``'s ``"expressions"`` list
(without that file: every other ``.obj`` in name order, which also picks up the
``PupilDilate_*`` meshes; pass ``expressions`` to choose). Each mode is the difference from the
neutral mesh; OBJ files are read with a small parser that keeps the ``v`` lines only. To sample
the model at our landmarks a correspondence is needed: for each of the 468 tracker points either
one ICT vertex index, or three vertex indices with barycentric weights (a point on an ICT
triangle). Give one if you have it (the best is a non-rigid registration of the ICT neutral to
the tracker's mesh). Otherwise :func:`ict_correspondence` computes an approximate one: a
similarity fitted on 12 anchor points (eye corners, nose, mouth corners, lip centres, chin; the
ICT indices come from the 68-point markup published in the FaceKit README), refined by
iterated closest points, then each template point takes the nearest vertex of ICT's face area.
This is approximate: the template (one person's face) and ICT's generic neutral face differ in
proportions, so points can land a few millimetres off, most visibly at the lips and eyelids,
where the correct vertex of the upper or the lower lid/lip is easy to miss. The loader is tested
on small OBJ files written by the tests, not on the real FaceKit files (not available offline).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

from neuralhead.data.format import DatasetFiles
from neuralhead.errors import InputError
from neuralhead.geometry.rotation import similarity_transform
from neuralhead.tracking.expression import ExpressionBasis
from neuralhead.tracking.template import load_template
from neuralhead.tracking.topology import NUM_MESH

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

#: Default number of expression components (Sec. 3.4: 28 expression + 7 camera parameters).
NUM_EXPRESSION = 28

#: The first 9409 vertices of ICT-FaceKit's mesh are its face area (FaceKit README).
ICT_FACE_VERTICES = 9409

#: Tracker point -> ICT-FaceKit vertex for 12 landmarks of the 68-point markup in the FaceKit
#: README (0-indexed): chin (68-pt 8), nose bridge (27), nose tip (30), nose base (33), eye
#: corners (36, 39, 42, 45), mouth corners (48, 54), lip centres (51, 57).
ICT_ANCHORS: dict[int, int] = {
    152: 966,
    168: 978,
    1: 4857,
    2: 1147,
    33: 1507,
    133: 1528,
    362: 3742,
    263: 3721,
    61: 5708,
    291: 6213,
    0: 0,
    17: 5518,
}


@functools.lru_cache(maxsize=1)
def _triangle_groups() -> dict[str, np.ndarray]:
    path = resources.files("neuralhead.headgan").joinpath("data/face_mesh_triangles.npz")
    with path.open("rb") as f, np.load(f, allow_pickle=False) as data:
        return {name: data[name].astype(np.int64) for name in ("surface", "eyes", "mouth")}


def face_mesh_triangles(*, fill_eyes: bool = True, fill_mouth: bool = False) -> torch.Tensor:
    """Triangles ``(F, 3)`` of the tracker's 468-point face mesh (852, +28 eyes, +18 mouth).

    Consistently wound, normals ``(p1 - p0) x (p2 - p0)`` pointing out of the face.
    """
    groups = _triangle_groups()
    parts = [groups["surface"]]
    if fill_eyes:
        parts.append(groups["eyes"])
    if fill_mouth:
        parts.append(groups["mouth"])
    return torch.from_numpy(np.concatenate(parts))


def ncc_colors(mean: torch.Tensor) -> torch.Tensor:
    """Normalised coordinate code of each vertex: ``(v - min) / (max - min)`` per axis, (V, 3)."""
    low = mean.min(0).values
    span = (mean.max(0).values - low).clamp_min(1e-12)
    return (mean - low) / span


def _as_float(
    name: str, value: np.ndarray | torch.Tensor, shape: tuple[int | None, ...]
) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(value) if not torch.is_tensor(value) else value)
    tensor = tensor.to(torch.float32)
    if tensor.dim() != len(shape) or any(
        n is not None and n != m for n, m in zip(shape, tensor.shape)
    ):
        expected = ", ".join("?" if n is None else str(n) for n in shape)
        raise InputError(f"{name} must have shape ({expected}), got {tuple(tensor.shape)}")
    return tensor


@dataclass
class MorphableModel:
    """A linear face model ``s = mean + U_id p_id + U_exp p_exp`` (Eq. 1) with its mesh.

    Attributes:
        mean: ``(V, 3)`` mean shape in template space.
        identity_basis: ``(K_id, V, 3)``; ``identity_basis[k]`` is the displacement of one unit
            of coefficient ``k``.
        expression_basis: ``(K_exp, V, 3)``, likewise.
        triangles: ``(F, 3)`` long vertex indices.
        identity_std, expression_std: ``(K,)`` spread of each coefficient over the data the
            model was learned from (ones when unknown); fitting bounds coefficients to
            ``+/- bound * std``.
        expression_limits: optional ``(K_exp, 2)`` hard ``(low, high)`` limits that replace the
            std-based bounds for expression (blendshape models: ``[0, 1]``).
        expression_names: optional names of the expression components.
        description: where the model comes from.
        vertex_colors: ``(V, 3)`` NCC colours of the mean shape (derived, not stored).
    """

    mean: torch.Tensor
    identity_basis: torch.Tensor
    expression_basis: torch.Tensor
    triangles: torch.Tensor
    identity_std: torch.Tensor | None = None
    expression_std: torch.Tensor | None = None
    expression_limits: torch.Tensor | None = None
    expression_names: tuple[str, ...] = ()
    description: str = ""
    vertex_colors: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.mean = _as_float("mean", self.mean, (None, 3))
        v = self.mean.shape[0]
        self.identity_basis = _as_float("identity_basis", self.identity_basis, (None, v, 3))
        self.expression_basis = _as_float("expression_basis", self.expression_basis, (None, v, 3))
        k_id, k_exp = self.num_identity, self.num_expression
        self.identity_std = (
            torch.ones(k_id)
            if self.identity_std is None
            else _as_float("identity_std", self.identity_std, (k_id,))
        )
        self.expression_std = (
            torch.ones(k_exp)
            if self.expression_std is None
            else _as_float("expression_std", self.expression_std, (k_exp,))
        )
        if self.expression_limits is not None:
            self.expression_limits = _as_float(
                "expression_limits", self.expression_limits, (k_exp, 2)
            )
            if bool((self.expression_limits[:, 0] > self.expression_limits[:, 1]).any()):
                raise InputError("expression_limits must be (low, high) pairs with low <= high")
        triangles = torch.as_tensor(
            np.asarray(self.triangles) if not torch.is_tensor(self.triangles) else self.triangles
        )
        if triangles.dim() != 2 or triangles.shape[1] != 3 or triangles.is_floating_point():
            raise InputError(
                f"triangles must be an (F, 3) integer array, got {tuple(triangles.shape)}"
            )
        if triangles.numel() and (int(triangles.min()) < 0 or int(triangles.max()) >= v):
            raise InputError(f"triangles index vertices outside 0..{v - 1}")
        self.triangles = triangles.long()
        if self.expression_names and len(self.expression_names) != k_exp:
            raise InputError(
                f"{len(self.expression_names)} expression names for {k_exp} components"
            )
        self.expression_names = tuple(self.expression_names)
        self.vertex_colors = ncc_colors(self.mean)

    @property
    def num_vertices(self) -> int:
        return self.mean.shape[0]

    @property
    def num_identity(self) -> int:
        return self.identity_basis.shape[0]

    @property
    def num_expression(self) -> int:
        return self.expression_basis.shape[0]

    def shape(
        self,
        identity: torch.Tensor | np.ndarray | None,
        expression: torch.Tensor | np.ndarray | None,
    ) -> torch.Tensor:
        """Eq. 1: shapes ``(B, V, 3)`` from identity ``(B, K_id)`` and expression ``(B, K_exp)``.

        Either may be one vector (``(K,)``, shared by the batch) or None (zeros).
        """
        p_id = self._coefficients("identity", identity, self.num_identity)
        p_exp = self._coefficients("expression", expression, self.num_expression)
        batch = max(p_id.shape[0], p_exp.shape[0])
        for name, p in (("identity", p_id), ("expression", p_exp)):
            if p.shape[0] not in (1, batch):
                raise InputError(f"{name} has batch size {p.shape[0]}, expected 1 or {batch}")
        offset = torch.einsum("bk,kvc->bvc", p_id, self.identity_basis.to(p_id))
        offset = offset + torch.einsum("bk,kvc->bvc", p_exp, self.expression_basis.to(p_exp))
        return self.mean.to(offset) + offset

    def _coefficients(
        self, name: str, value: torch.Tensor | np.ndarray | None, k: int
    ) -> torch.Tensor:
        if value is None:
            return self.mean.new_zeros(1, k)
        p = torch.as_tensor(value, device=self.mean.device)
        p = p.to(self.mean.dtype if not p.is_floating_point() else p.dtype)
        if p.dim() == 1:
            p = p[None]
        if p.dim() != 2 or p.shape[1] != k:
            raise InputError(f"{name} coefficients must have shape (B, {k}), got {tuple(p.shape)}")
        return p

    def coefficient_bounds(self, bound: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower and upper bounds ``(K_id + K_exp,)``: ``+/- bound * std``, or the hard limits."""
        if bound <= 0:
            raise InputError(f"bound must be positive, got {bound}")
        std = torch.cat([self.identity_std, self.expression_std])
        lower, upper = -bound * std, bound * std
        if self.expression_limits is not None:
            lower[self.num_identity :] = self.expression_limits[:, 0]
            upper[self.num_identity :] = self.expression_limits[:, 1]
        return lower, upper

    def to(self, device: torch.device | str) -> MorphableModel:
        """A copy whose tensors live on ``device``."""
        limits = None if self.expression_limits is None else self.expression_limits.to(device)
        return MorphableModel(
            mean=self.mean.to(device),
            identity_basis=self.identity_basis.to(device),
            expression_basis=self.expression_basis.to(device),
            triangles=self.triangles.to(device),
            identity_std=self.identity_std.to(device),
            expression_std=self.expression_std.to(device),
            expression_limits=limits,
            expression_names=self.expression_names,
            description=self.description,
        )

    def save(self, path: str | Path) -> None:
        """Write the model to an ``.npz`` file (plain arrays, no pickle)."""
        arrays = {
            "format_version": np.int64(FORMAT_VERSION),
            "mean": self.mean.cpu().numpy(),
            "identity_basis": self.identity_basis.cpu().numpy(),
            "expression_basis": self.expression_basis.cpu().numpy(),
            "triangles": self.triangles.cpu().numpy().astype(np.int32),
            "identity_std": self.identity_std.cpu().numpy(),
            "expression_std": self.expression_std.cpu().numpy(),
            "expression_names": np.array(self.expression_names, dtype=np.str_),
            "description": np.array(self.description, dtype=np.str_),
        }
        if self.expression_limits is not None:
            arrays["expression_limits"] = self.expression_limits.cpu().numpy()
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> MorphableModel:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"face model file {path} does not exist")
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"{path} is not a face model file ({exc})") from None
        with data:
            if "mean" not in data or "identity_basis" not in data:
                raise InputError(f"{path} is not a face model file (no mean / identity_basis)")
            if int(data["format_version"]) > FORMAT_VERSION:
                raise InputError(f"{path} was written by a newer neuralhead")
            limits = data["expression_limits"] if "expression_limits" in data else None
            return cls(
                mean=data["mean"],
                identity_basis=data["identity_basis"],
                expression_basis=data["expression_basis"],
                triangles=data["triangles"].astype(np.int64),
                identity_std=data["identity_std"],
                expression_std=data["expression_std"],
                expression_limits=limits,
                expression_names=tuple(str(n) for n in data["expression_names"]),
                description=str(data["description"]),
            )


def template_face_model(*, fill_eyes: bool = True, fill_mouth: bool = False) -> MorphableModel:
    """The tracker's canonical face with its mesh and no bases (``K_id = K_exp = 0``)."""
    mean = load_template().vertices[:NUM_MESH]
    return MorphableModel(
        mean=mean,
        identity_basis=np.zeros((0, NUM_MESH, 3), np.float32),
        expression_basis=np.zeros((0, NUM_MESH, 3), np.float32),
        triangles=face_mesh_triangles(fill_eyes=fill_eyes, fill_mouth=fill_mouth),
        description="tracker template (mean shape only)",
    )


# ---------------------------------------------------------------------------------------------
# Learned from prepared datasets


def _training_frames(dataset: DatasetFiles, limit: int) -> np.ndarray:
    """Valid training frames of a dataset, evenly subsampled to at most ``limit``."""
    train = np.array(dataset.split_range("train"), dtype=np.int64)
    valid = np.asarray(dataset.array("valid"), bool)
    frames = train[valid[train]]
    if len(frames) > limit:
        frames = frames[np.unique(np.linspace(0, len(frames) - 1, limit).round().astype(np.int64))]
    return frames


def _leading_components(
    cov: np.ndarray, k: int, rel_tol: float = 1e-8
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` leading eigenvectors (rows) and their std of a covariance, rank-limited.

    Same sign rule as :class:`ExpressionBasis`: each component's largest entry is positive.
    """
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1][:k]
    eigval = np.clip(eigval[order], 0.0, None)
    keep = eigval > rel_tol * max(float(eigval[0]) if len(eigval) else 0.0, 1e-300)
    components = eigvec[:, order[keep]].T
    flip = np.sign(components[np.arange(len(components)), np.abs(components).argmax(1)])
    return components * flip[:, None], np.sqrt(eigval[keep])


def build_face_model(
    dataset_dirs: Iterable[str | Path],
    *,
    num_identity: int = 50,
    num_expression: int = NUM_EXPRESSION,
    max_frames_per_video: int = 1000,
    fill_eyes: bool = True,
    fill_mouth: bool = False,
) -> MorphableModel:
    """Learn identity and expression bases from prepared datasets (one video per person).

    Identity: PCA of the per-video mean canonical shapes (468 surface points of ``canonical.npy``
    over the valid training frames), at most ``videos - 1`` components; with one video the basis
    is empty and a warning says so. Expression: PCA of the pooled within-video deviations from
    each video's mean, projected off the identity space, so both bases together are orthonormal.
    Each video contributes at most ``max_frames_per_video`` evenly spaced frames. A basis has
    fewer components than asked for when the data spans fewer directions (logged). The mean
    shape is the mean of the per-video means. Memory is one ``1404 x 1404`` scatter matrix plus
    one video's subsample at a time.
    """
    datasets = [DatasetFiles.open(d) for d in dataset_dirs]
    if not datasets:
        raise InputError("build_face_model needs at least one prepared dataset")
    if num_identity < 0 or num_expression < 0 or max_frames_per_video < 2:
        raise InputError(
            "num_identity and num_expression must be >= 0 and max_frames_per_video >= 2"
        )
    dim = NUM_MESH * 3
    means, scatter, count = [], np.zeros((dim, dim)), 0
    for dataset in datasets:
        frames = _training_frames(dataset, max_frames_per_video)
        if len(frames) < 2:
            raise InputError(f"{dataset.root} has fewer than 2 valid training frames")
        shapes = np.asarray(dataset.array("canonical")[frames][:, :NUM_MESH], np.float64).reshape(
            len(frames), dim
        )
        video_mean = shapes.mean(0)
        deviation = shapes - video_mean
        scatter += deviation.T @ deviation
        count += len(frames)
        means.append(video_mean)
    video_means = np.stack(means)

    identity_components, identity_std = np.zeros((0, dim)), np.zeros(0)
    mean = video_means.mean(0)
    if len(datasets) < 2:
        log.warning(
            "one dataset: the identity basis is empty (K_id = 0); learn from two or more videos of "
            "different people to separate identity from expression"
        )
    elif num_identity > 0:
        identity = ExpressionBasis.fit(
            video_means.reshape(-1, NUM_MESH, 3), min(num_identity, len(datasets) - 1)
        )
        keep = identity.stddev > 1e-6 * max(float(identity.stddev[0]), 1e-300)
        identity_components = identity.components[keep].astype(np.float64)
        identity_std = identity.stddev[keep].astype(np.float64)
        mean = identity.mean.reshape(-1).astype(np.float64)

    off_identity = np.eye(dim) - identity_components.T @ identity_components
    cov = off_identity @ (scatter / count) @ off_identity
    expression_components, expression_std = _leading_components(cov, num_expression)
    # The leading eigenvectors lie off the identity space up to rounding: make it exact.
    if len(expression_components):
        q, r = np.linalg.qr((expression_components @ off_identity).T)
        expression_components = (q * np.sign(np.diag(r))).T
    log.info(
        "face model: %d identity components (%d asked), %d expression components (%d asked); "
        "fewer when the data spans fewer directions",
        len(identity_components),
        num_identity,
        len(expression_components),
        num_expression,
    )
    return MorphableModel(
        mean=mean.reshape(NUM_MESH, 3),
        identity_basis=identity_components.reshape(-1, NUM_MESH, 3),
        expression_basis=expression_components.reshape(-1, NUM_MESH, 3),
        triangles=face_mesh_triangles(fill_eyes=fill_eyes, fill_mouth=fill_mouth),
        identity_std=identity_std,
        expression_std=expression_std,
        description=f"PCA of {len(datasets)} prepared datasets ({count} frames)",
    )


# ---------------------------------------------------------------------------------------------
# ICT-FaceKit


def read_obj_vertices(path: str | Path) -> np.ndarray:
    """The ``v x y z`` positions ``(V, 3)`` of a Wavefront OBJ file (other lines are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"mesh file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("v "):
                rows.append(line.split()[1:4])
    if not rows:
        raise InputError(f"{path} has no vertices ('v x y z' lines)")
    try:
        return np.asarray(rows, np.float64)
    except ValueError as exc:
        raise InputError(f"{path} has a malformed vertex line ({exc})") from None


@dataclass(frozen=True)
class Correspondence:
    """Where each tracker point lies on another mesh: ``sum_k weights[:, k] * mesh[indices[:, k]]``."""

    indices: np.ndarray  # (P, 3) int64 vertex indices
    weights: np.ndarray  # (P, 3) float64 barycentric weights, rows summing to one

    @classmethod
    def from_vertices(cls, vertex_indices: np.ndarray) -> Correspondence:
        idx = np.asarray(vertex_indices, np.int64).reshape(-1, 1)
        return cls(indices=np.repeat(idx, 3, 1), weights=np.tile([1.0, 0.0, 0.0], (len(idx), 1)))

    @classmethod
    def load(cls, path: str | Path) -> Correspondence:
        """``.npy``/``.txt`` with one vertex index per tracker point, or ``.npz`` with
        ``indices`` and ``weights`` ``(468, 3)`` (barycentric points on triangles)."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"correspondence file {path} does not exist")
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                if "indices" not in data or "weights" not in data:
                    raise InputError(f"{path} must hold 'indices' and 'weights' arrays")
                return cls(
                    indices=data["indices"].astype(np.int64),
                    weights=data["weights"].astype(np.float64),
                )
        values = np.load(path, allow_pickle=False) if path.suffix == ".npy" else np.loadtxt(path)
        return cls.from_vertices(np.asarray(values).astype(np.int64))

    def sample(self, vertices: np.ndarray) -> np.ndarray:
        """Points ``(..., P, 3)`` of meshes ``(..., V, 3)``."""
        return np.einsum("...pkc,pk->...pc", vertices[..., self.indices, :], self.weights)

    def check(self, num_points: int, num_vertices: int) -> None:
        if self.indices.shape != (num_points, 3) or self.weights.shape != (num_points, 3):
            raise InputError(
                f"the correspondence must give {num_points} points, got indices {self.indices.shape}"
            )
        if self.indices.min() < 0 or self.indices.max() >= num_vertices:
            raise InputError(f"the correspondence indexes vertices outside 0..{num_vertices - 1}")
        if not np.allclose(self.weights.sum(1), 1.0, atol=1e-4):
            raise InputError("the correspondence's barycentric weights must sum to one per point")


def _umeyama(source: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    scale, rot, trans = similarity_transform(torch.from_numpy(source), torch.from_numpy(target))
    return float(scale), rot.numpy(), trans.numpy()


def ict_correspondence(
    neutral: np.ndarray,
    *,
    anchors: dict[int, int] | None = None,
    candidates: Sequence[int] | np.ndarray | None = None,
    iterations: int = 5,
) -> np.ndarray:
    """An approximate tracker-point -> ICT-vertex correspondence ``(468,)`` (nearest vertices).

    A similarity maps the ICT ``neutral`` mesh onto the template through the ``anchors``
    (tracker index -> ICT vertex index; :data:`ICT_ANCHORS` by default), then ``iterations``
    rounds of closest points refit it on all 468 points; each template point finally takes its
    nearest ``candidates`` vertex (ICT's face area, the first :data:`ICT_FACE_VERTICES`, by
    default). See the module docstring for how approximate this is.
    """
    anchors = ICT_ANCHORS if anchors is None else anchors
    neutral = np.asarray(neutral, np.float64)
    if candidates is None:
        candidates = np.arange(min(ICT_FACE_VERTICES, len(neutral)))
    candidates = np.asarray(candidates, np.int64)
    if len(anchors) < 3:
        raise InputError(f"need at least 3 anchors, got {len(anchors)}")
    if max(anchors.values()) >= len(neutral):
        raise InputError(
            f"the anchors index vertices beyond the {len(neutral)}-vertex mesh: is it ICT-FaceKit's "
            "generic_neutral_mesh.obj? For another mesh pass anchors for it or a correspondence"
        )
    template = load_template().vertices[:NUM_MESH].astype(np.float64)
    tracker_idx = np.array(list(anchors.keys()))
    scale, rot, trans = _umeyama(neutral[list(anchors.values())], template[tracker_idx])
    points = neutral[candidates]
    for _ in range(iterations):
        nearest = cKDTree(scale * points @ rot.T + trans).query(template)[1]
        scale, rot, trans = _umeyama(points[nearest], template)
    return candidates[cKDTree(scale * points @ rot.T + trans).query(template)[1]]


def load_ict_facekit(
    model_dir: str | Path,
    correspondence: Correspondence | np.ndarray | str | Path | None = None,
    *,
    num_identity: int = 100,
    expressions: Sequence[str] | None = None,
    fill_eyes: bool = True,
    fill_mouth: bool = False,
) -> MorphableModel:
    """The ICT-FaceKit model sampled at the 468 tracker points, in template space.

    ``model_dir`` is FaceKit's ``FaceXModel/`` folder (files listed in the module docstring).
    ``correspondence``: a :class:`Correspondence`, a ``(468,)`` array of ICT vertex indices, a
    file for :meth:`Correspondence.load`, or None to compute one with
    :func:`ict_correspondence` (approximate). ``expressions`` selects blendshapes by name.

    The sampled neutral is mapped into template space by the least-squares similarity onto the
    template; the modes get the same rotation and scale. Identity coefficients have unit std
    (as ICT samples them), expression coefficients the limits [0, 1]. The bases are not
    orthonormal, so fitting solves a bounded least squares rather than clipping a projection.
    """
    model_dir = Path(model_dir)
    neutral_path = model_dir / "generic_neutral_mesh.obj"
    if not neutral_path.is_file():
        raise InputError(
            f"{model_dir} is not ICT-FaceKit's FaceXModel folder (no generic_neutral_mesh.obj); "
            "clone https://github.com/ICT-VGL/ICT-FaceKit and pass its FaceXModel directory"
        )
    neutral = read_obj_vertices(neutral_path)
    identity_paths = [model_dir / f"identity{k:03d}.obj" for k in range(num_identity)]
    missing = [p.name for p in identity_paths if not p.is_file()]
    if missing:
        raise InputError(f"{model_dir} lacks {len(missing)} identity meshes (first: {missing[0]})")
    if expressions is None:
        index_file = model_dir / "vertex_indices.json"
        if index_file.is_file():
            expressions = json.loads(index_file.read_text())["expressions"]
        else:
            expressions = sorted(
                p.stem
                for p in model_dir.glob("*.obj")
                if p.stem != "generic_neutral_mesh" and not p.stem.startswith("identity")
            )
    expressions = list(expressions)
    for name in expressions:
        if not (model_dir / f"{name}.obj").is_file():
            raise InputError(f"{model_dir} lacks the expression mesh {name}.obj")

    if correspondence is None:
        correspondence = Correspondence.from_vertices(ict_correspondence(neutral))
    elif isinstance(correspondence, (str, Path)):
        correspondence = Correspondence.load(correspondence)
    elif not isinstance(correspondence, Correspondence):
        correspondence = Correspondence.from_vertices(np.asarray(correspondence))
    correspondence.check(NUM_MESH, len(neutral))

    def mode(path: Path) -> np.ndarray:
        vertices = read_obj_vertices(path)
        if vertices.shape != neutral.shape:
            raise InputError(
                f"{path} has {len(vertices)} vertices, the neutral mesh {len(neutral)}"
            )
        return correspondence.sample(vertices - neutral)

    mean = correspondence.sample(neutral)
    template = load_template().vertices[:NUM_MESH].astype(np.float64)
    scale, rot, trans = _umeyama(mean, template)
    linear = scale * rot.T  # applied to row vectors

    def modes(paths: list[Path]) -> np.ndarray:
        return np.stack([mode(p) for p in paths]) if paths else np.zeros((0, NUM_MESH, 3))

    identity = modes(identity_paths)
    expression = modes([model_dir / f"{name}.obj" for name in expressions])
    return MorphableModel(
        mean=mean @ linear + trans,
        identity_basis=identity @ linear,
        expression_basis=expression @ linear,
        triangles=face_mesh_triangles(fill_eyes=fill_eyes, fill_mouth=fill_mouth),
        identity_std=np.ones(len(identity)),
        expression_std=np.ones(len(expression)),
        expression_limits=np.tile([0.0, 1.0], (len(expression), 1)),
        expression_names=tuple(expressions),
        description=f"ICT-FaceKit ({len(identity)} identity, {len(expression)} expression shapes)",
    )
