from __future__ import annotations

import pytest
import torch

from neuralhead.errors import InputError
from neuralhead.headgan.face_model import template_face_model
from neuralhead.headgan.fitting import project
from neuralhead.headgan.renderer import rasterize, render_ncc

RGB = torch.eye(3)  # corner 0 red, corner 1 green, corner 2 blue


def one_triangle(z: float = 2.0) -> torch.Tensor:
    return torch.tensor([[[1.0, 1.0, z], [9.0, 1.0, z], [1.0, 9.0, z]]])


def test_triangle_pixels_and_barycentric_colours():
    image, mask = render_ncc(one_triangle(), torch.tensor([[0, 1, 2]]), RGB, 12, return_mask=True)
    assert image.shape == (1, 3, 12, 12) and mask.shape == (1, 1, 12, 12)
    # Pixel (i, j) is sampled at (j + 0.5, i + 0.5): inside when j, i >= 1 and i + j <= 9.
    ii, jj = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
    expected = (ii >= 1) & (jj >= 1) & (ii + jj <= 9)
    assert int(expected.sum()) == 36
    assert torch.equal(mask[0, 0].bool(), expected)
    assert torch.all(image[0][:, ~expected] == 0)
    # Weights of corners 1 and 2 are (x - 1) / 8 and (y - 1) / 8.
    assert torch.allclose(image[0, :, 2, 2], torch.tensor([0.625, 0.1875, 0.1875]), atol=1e-6)
    assert torch.allclose(image[0, :, 5, 2], torch.tensor([0.25, 0.1875, 0.5625]), atol=1e-6)
    assert torch.allclose(image[0, :, 1, 6], torch.tensor([0.25, 0.6875, 0.0625]), atol=1e-6)
    flat = render_ncc(one_triangle(), torch.tensor([[0, 1, 2]]), RGB, 12, shading="flat")
    assert torch.allclose(flat[0][:, expected], torch.full((3, 36), 1 / 3))


def test_winding_does_not_matter_and_face_index_marks_background():
    a = render_ncc(one_triangle(), torch.tensor([[0, 1, 2]]), RGB, 12)
    b = render_ncc(one_triangle(), torch.tensor([[0, 2, 1]]), RGB, 12)
    assert torch.allclose(a, b)
    raster = rasterize(one_triangle(), torch.tensor([[0, 1, 2]]), (12, 14))
    assert raster.face_index.shape == (1, 12, 14)
    assert set(raster.face_index.unique().tolist()) == {-1, 0}
    covered = raster.face_index >= 0
    assert torch.allclose(raster.barycentric[covered].sum(-1), torch.ones(int(covered.sum())))
    assert torch.all(raster.barycentric[~covered] == 0)


def two_squares(z_red: float, z_green: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two overlapping quads (two triangles each), one all red and one all green."""
    red = [[2, 2, z_red], [10, 2, z_red], [10, 10, z_red], [2, 10, z_red]]
    green = [[6, 6, z_green], [14, 6, z_green], [14, 14, z_green], [6, 14, z_green]]
    vertices = torch.tensor([red + green], dtype=torch.float32)
    triangles = torch.tensor([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]])
    colours = torch.tensor([[1.0, 0, 0]] * 4 + [[0, 1.0, 0]] * 4)
    return vertices, triangles, colours


@pytest.mark.parametrize("flip_order", [False, True])
def test_nearer_triangle_wins(flip_order):
    for z_red, z_green, winner in ((1.0, 5.0, 0), (5.0, 1.0, 1)):
        vertices, triangles, colours = two_squares(z_red, z_green)
        if flip_order:
            triangles = triangles.flip(0)
        image = render_ncc(vertices, triangles, colours, 16)
        overlap = image[0, :, 7, 7]
        assert overlap[winner] > 0.999 and overlap[1 - winner] < 1e-6
        assert image[0, 0, 3, 3] > 0.999 and image[0, 1, 12, 12] > 0.999  # each alone elsewhere


def test_depth_is_interpolated_per_pixel():
    # A sloping quad (depth 0 at x = 0 to 16 at x = 16) crosses a flat one at depth 8.
    slope = [[0, 0, 0], [16, 0, 16], [16, 16, 16], [0, 16, 0]]
    flat = [[0, 0, 8], [16, 0, 8], [16, 16, 8], [0, 16, 8]]
    vertices = torch.tensor([slope + flat], dtype=torch.float32)
    triangles = torch.tensor([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]])
    colours = torch.tensor([[1.0, 0, 0]] * 4 + [[0, 1.0, 0]] * 4)
    image = render_ncc(vertices, triangles, colours, 16)
    red_columns = (image[0, 0] > 0.999).all(0)
    assert red_columns[:8].all() and not red_columns[8:].any()


def test_batch_matches_single_frames_and_sizes():
    model = template_face_model()
    cameras = torch.tensor(
        [
            [0.6, 0.0, 0.0, 0.0, 0.0, 0.1, 0.0],
            [0.5, 0.2, -0.4, 0.1, 0.1, 0.0, 0.0],
            [0.7, -0.1, 0.5, -0.2, -0.1, 0.05, 0.3],
        ]
    )
    coverage = {}
    for size in (256, 512):
        vertices = project(model.mean, cameras, size)
        batch, mask = render_ncc(
            vertices, model.triangles, model.vertex_colors, size, return_mask=True
        )
        assert batch.shape == (3, 3, size, size) and mask.shape == (3, 1, size, size)
        assert batch.min() >= 0 and batch.max() <= 1
        for k in range(3):
            single = render_ncc(vertices[k : k + 1], model.triangles, model.vertex_colors, size)
            assert torch.equal(single[0], batch[k])
        coverage[size] = mask.mean((1, 2, 3))
        assert torch.all(coverage[size] > 0.05)
        assert torch.all(batch.sum(1)[mask[:, 0] == 0] == 0)
    assert torch.allclose(coverage[256], coverage[512], rtol=0.02)


def test_parts_outside_the_image_are_clipped():
    # Corners at (-2, -2), (6, -2) and (-2, 6).
    vertices = one_triangle() + torch.tensor([-3.0, -3.0, 0.0])
    mask = render_ncc(vertices, torch.tensor([[0, 1, 2]]), RGB, 12, return_mask=True)[1]
    ii, jj = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
    assert torch.equal(mask[0, 0].bool(), ii + jj <= 3)  # x + y <= 4 at (j + 0.5, i + 0.5)
    far = render_ncc(one_triangle() + 100.0, torch.tensor([[0, 1, 2]]), RGB, 12)
    assert torch.all(far == 0)


def test_bad_input():
    tri = torch.tensor([[0, 1, 2]])
    with pytest.raises(InputError, match="vertices_px"):
        render_ncc(torch.zeros(3, 3), tri, RGB, 12)
    with pytest.raises(InputError, match="outside"):
        render_ncc(one_triangle(), torch.tensor([[0, 1, 3]]), RGB, 12)
    with pytest.raises(InputError, match="vertex_colors"):
        render_ncc(one_triangle(), tri, torch.ones(4, 3), 12)
    with pytest.raises(InputError, match="shading"):
        render_ncc(one_triangle(), tri, RGB, 12, shading="phong")
    with pytest.raises(InputError, match="image_size"):
        render_ncc(one_triangle(), tri, RGB, 0)
    with pytest.raises(InputError, match="NaN"):
        render_ncc(one_triangle() * float("nan"), tri, RGB, 12)
