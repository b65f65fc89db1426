"""Differentiable, batched 3D geometry shared by the trackers and the models."""

from neuralhead.geometry.rotation import (
    euler_to_matrix,
    matrix_to_euler,
    rotation_angle,
    similarity_transform,
)

__all__ = ["euler_to_matrix", "matrix_to_euler", "rotation_angle", "similarity_transform"]
