"""The nearest-neighbour retrieval baseline reported beside every person-specific model.

For each driving frame it returns the training frame whose parameters are closest: the
distance is the sum over pose (6), gaze (2) and expression (K) of each group's mean squared
difference in training standard deviations, so that every group weighs the same however many
numbers it has (our choice). A model that only memorised its training frames scores like
this baseline; one that learned to interpolate beats it.
"""

from __future__ import annotations

import numpy as np

from neuralhead.dnp.portrait import PortraitData


class NearestNeighbourBaseline:
    def __init__(self, data: PortraitData) -> None:
        self.data = data
        self._groups = [data.pose, data.gaze, data.expression]
        self._std = [g.std(0) + 1e-6 for g in self._groups]

    def nearest(self, pose: np.ndarray, gaze: np.ndarray, expression: np.ndarray, chunk: int = 256) -> np.ndarray:
        """Rows of the training arrays (``data.frames`` gives frame numbers), one per query."""
        queries = [np.asarray(pose), np.asarray(gaze), np.asarray(expression)]
        out = np.empty(len(queries[0]), dtype=np.int64)
        for start in range(0, len(out), chunk):
            sl = slice(start, start + chunk)
            dist = 0.0
            for train, query, std in zip(self._groups, queries, self._std):
                diff = (query[sl, None, :] - train[None, :, :]) / std
                dist = dist + (diff**2).mean(-1)
            out[sl] = np.argmin(dist, axis=1)
        return out
