"""Expression coefficients: pose-normalised landmark deformations on a linear basis.

DNP conditions on expression parameters ``e ∈ R^n_exp`` (Sec. 3.1), which the paper takes
from a 3DMM tracker. Here they come from the dense landmarks:

1. Each frame's 468 surface points are mapped into template space with the inverse of the
   fitted head pose (:meth:`HeadPoseFit.canonicalize`), which removes rotation, translation
   and scale and leaves the non-rigid deformation plus the person's face shape.
2. The basis is the principal component analysis of these shapes over the clip's frames
   with a face: its ``mean`` is the person's average face and its ``components`` (rows,
   orthonormal) are the main modes of deformation: jaw opening, smile, blinks, brows...
3. A frame's coefficients are its deformation from the mean projected on the components,
   in units of the first component's standard deviation: the strongest mode has unit
   variance and every other keeps its natural, smaller spread. Components are not whitened
   one by one on purpose: the weak ones carry mostly tracking noise, and scaling them up to
   unit variance would hand a network a per-frame fingerprint to memorise instead of an
   expression to interpolate.

The basis is stored with the dataset (``expression_basis.npz``). Coefficients of different
people live in different bases; to transfer an expression change from one person to
another, project the driver's landmark deformation (in template space, where both faces
share a scale) on the target's basis with :meth:`ExpressionBasis.project_deformation`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neuralhead.tracking.topology import NUM_MESH


@dataclass
class ExpressionBasis:
    mean: np.ndarray  # (468, 3) template-space mean shape of the person
    components: np.ndarray  # (K, 468 * 3), orthonormal rows
    stddev: np.ndarray  # (K,) standard deviation of each coefficient over the fitting frames
    explained_variance_ratio: np.ndarray  # (K,)
    num_frames: int

    @property
    def num_components(self) -> int:
        return len(self.components)

    @property
    def scale(self) -> float:
        """The unit of the coefficients: the first component's standard deviation."""
        return float(max(self.stddev[0], 1e-12))

    @classmethod
    def fit(cls, shapes: np.ndarray, num_components: int) -> ExpressionBasis:
        """PCA of template-space shapes ``(N, 468, 3)`` (or more points: extras are ignored).

        Works on a memory-mapped array chunk by chunk, so the clip's length does not matter.
        """
        n = len(shapes)
        if n < 2:
            raise ValueError("the expression basis needs at least 2 frames with a face")
        dim = NUM_MESH * 3
        total = np.zeros(dim)
        outer = np.zeros((dim, dim))
        for start in range(0, n, 1024):
            chunk = np.asarray(shapes[start : start + 1024], np.float64)[:, :NUM_MESH].reshape(-1, dim)
            total += chunk.sum(0)
            outer += chunk.T @ chunk
        mean = total / n
        cov = outer / n - np.outer(mean, mean)
        eigval, eigvec = np.linalg.eigh(cov)
        order = np.argsort(eigval)[::-1][:num_components]
        eigval = np.clip(eigval[order], 0.0, None)
        components = eigvec[:, order].T
        # Fix each component's sign so the basis is reproducible: largest entry positive.
        flip = np.sign(components[np.arange(len(components)), np.abs(components).argmax(1)])
        components *= flip[:, None]
        stddev = np.sqrt(eigval)
        # The sum of all eigenvalues is the trace: no second eigendecomposition needed.
        total_var = max(float(np.trace(cov)), 1e-12)
        return cls(
            mean=mean.reshape(NUM_MESH, 3).astype(np.float32),
            components=components.astype(np.float32),
            stddev=stddev.astype(np.float32),
            explained_variance_ratio=(eigval / total_var).astype(np.float32),
            num_frames=n,
        )

    def project(self, shapes: np.ndarray) -> np.ndarray:
        """Coefficients ``(N, K)`` of template-space shapes ``(N, ≥468, 3)``."""
        return self.project_deformation(np.asarray(shapes)[:, :NUM_MESH] - self.mean)

    def project_deformation(self, deformation: np.ndarray) -> np.ndarray:
        """Coefficients of a deformation (a difference of template-space shapes)."""
        flat = np.asarray(deformation, np.float32)[:, :NUM_MESH].reshape(len(deformation), -1)
        return (flat @ self.components.T) / self.scale

    def reconstruct(self, coefficients: np.ndarray) -> np.ndarray:
        """Template-space shapes ``(N, 468, 3)`` from coefficients ``(N, K)``."""
        flat = (np.asarray(coefficients, np.float32) * self.scale) @ self.components
        return flat.reshape(-1, NUM_MESH, 3) + self.mean

    def save(self, path: str | Path) -> None:
        np.savez(
            path,
            mean=self.mean,
            components=self.components,
            stddev=self.stddev,
            explained_variance_ratio=self.explained_variance_ratio,
            num_frames=np.int64(self.num_frames),
        )

    @classmethod
    def load(cls, path: str | Path) -> ExpressionBasis:
        with np.load(path, allow_pickle=False) as data:
            return cls(
                mean=data["mean"],
                components=data["components"],
                stddev=data["stddev"],
                explained_variance_ratio=data["explained_variance_ratio"],
                num_frames=int(data["num_frames"]),
            )
