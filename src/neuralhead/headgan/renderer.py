"""The 3D face render R(s, c) of HeadGAN: a normalised-coordinate-code (NCC) image (Sec. 4.1).

Sec. 4.1 rasterises the fitted mesh into a visibility map that stores, per pixel, the index of
the visible triangle, and colours the pixel with the normalised x-y-z coordinates of the mean
shape (PNCC, Zhu et al. 2016). :func:`rasterize` makes that map (with the barycentric
coordinates of the pixel in its triangle) and :func:`render_ncc` colours it, either
``"smooth"``: the mean shape's normalised coordinates at the visible surface point (barycentric
interpolation of the vertex colours; the shared HeadGAN contract and our default), or
``"flat"``: those of the centre of the visible triangle (the paper's wording).

The camera is orthographic (see :func:`neuralhead.headgan.fitting.project`), so depth varies
linearly over a triangle on screen and the z-buffer interpolates it with the same barycentric
weights; smaller z is nearer the camera. Pixel ``(i, j)`` is sampled at its centre
``(x, y) = (j + 0.5, i + 0.5)``, the convention of the tracker's landmarks (x = u * width).

Vectorised in PyTorch: each triangle's barycentric coordinates are evaluated on the pixels of
its bounding box (triangles sorted by box size and processed in chunks padded to the chunk's
largest box, so that memory stays bounded), the nearest candidate per pixel is chosen with
``scatter_reduce(amin)`` on depth and then on the triangle index (a deterministic tie break),
and the winner's colour is gathered. This is data preprocessing: no gradient flows through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neuralhead.errors import InputError

_SHADINGS = ("smooth", "flat")


@dataclass
class Rasterization:
    """Per-pixel visibility: the visible triangle (``-1`` for background) and barycentrics."""

    face_index: torch.Tensor  # (B, H, W) long
    barycentric: torch.Tensor  # (B, H, W, 3), zero on background

    @property
    def mask(self) -> torch.Tensor:
        """``(B, 1, H, W)`` float, 1 where the face covers the pixel."""
        return (self.face_index >= 0).unsqueeze(1).to(self.barycentric.dtype)


def _image_hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if not (isinstance(h, int) and isinstance(w, int)) or h <= 0 or w <= 0:
        raise InputError(f"image_size must be a positive int or (H, W), got {image_size!r}")
    return h, w


@torch.no_grad()
def rasterize(
    vertices_px: torch.Tensor,
    triangles: torch.Tensor,
    image_size: int | tuple[int, int],
    *,
    chunk_pixels: int = 1 << 21,
) -> Rasterization:
    """Z-buffer the mesh: vertices ``(B, V, 3)`` in pixels (x right, y down, z depth).

    ``chunk_pixels`` bounds the candidate pixels evaluated at once (memory, not results).
    """
    if vertices_px.dim() != 3 or vertices_px.shape[-1] != 3:
        raise InputError(f"vertices_px must have shape (B, V, 3), got {tuple(vertices_px.shape)}")
    triangles = torch.as_tensor(triangles, device=vertices_px.device)
    if triangles.dim() != 2 or triangles.shape[1] != 3 or triangles.is_floating_point():
        raise InputError(
            f"triangles must be an (F, 3) integer tensor, got {tuple(triangles.shape)}"
        )
    num_vertices = vertices_px.shape[1]
    if triangles.numel() and (int(triangles.min()) < 0 or int(triangles.max()) >= num_vertices):
        raise InputError(f"triangles index vertices outside 0..{num_vertices - 1}")
    if not bool(torch.isfinite(vertices_px).all()):
        raise InputError("vertices_px holds NaN or infinite values")
    h, w = _image_hw(image_size)
    batch, device = vertices_px.shape[0], vertices_px.device
    dtype = vertices_px.dtype if vertices_px.is_floating_point() else torch.float32
    verts = vertices_px.to(dtype)

    tri = verts[:, triangles.long()]  # (B, F, 3 corners, 3 coords)
    x, y = tri[..., 0], tri[..., 1]
    # Pixel j is inside [min_x, max_x] when its centre j + 0.5 is.
    j0 = torch.ceil(x.min(-1).values - 0.5).clamp(min=0).long()
    j1 = torch.floor(x.max(-1).values - 0.5).clamp(max=w - 1).long()
    i0 = torch.ceil(y.min(-1).values - 0.5).clamp(min=0).long()
    i1 = torch.floor(y.max(-1).values - 0.5).clamp(max=h - 1).long()
    b_idx, f_idx = ((j1 >= j0) & (i1 >= i0)).nonzero(as_tuple=True)
    j0, j1, i0, i1 = j0[b_idx, f_idx], j1[b_idx, f_idx], i0[b_idx, f_idx], i1[b_idx, f_idx]
    # Barycentric weights are affine in the pixel offset (dx, dy) from the box's first pixel
    # centre: w_k = A_k dx + B_k dy + C_k. Offsets keep the numbers small, so float32 suffices
    # for the many evaluations once the coefficients are computed in float64.
    corners = tri[b_idx, f_idx].double()
    lx = corners[..., 0] - (j0.double() + 0.5)[:, None]
    ly = corners[..., 1] - (i0.double() + 0.5)[:, None]
    ex, ey = lx - lx[:, :1], ly - ly[:, :1]  # edges from corner 0
    area = ex[:, 1] * ey[:, 2] - ex[:, 2] * ey[:, 1]
    solid = area.abs() > 1e-9
    b_idx, f_idx, j0, j1, i0, i1 = (t[solid] for t in (b_idx, f_idx, j0, j1, i0, i1))
    lx, ly, area = lx[solid], ly[solid], area[solid]
    depth_corners = corners[solid][..., 2].to(dtype)
    # Weight of corner k: signed area of (corner k+1, corner k+2, pixel) over the triangle's.
    xa, ya, xb, yb = lx.roll(-1, 1), ly.roll(-1, 1), lx.roll(-2, 1), ly.roll(-2, 1)
    coef = (
        torch.stack([ya - yb, xb - xa, (yb - ya) * xa - (xb - xa) * ya], -1) / area[:, None, None]
    )
    coef = coef.to(dtype)  # (n, 3 corners, 3)
    widths, heights = j1 - j0 + 1, i1 - i0 + 1
    # Sorted by the longer box side: a chunk padded to its last box's square holds every box.
    order = torch.argsort(torch.maximum(widths, heights))
    b_idx, f_idx, j0, i0, coef, depth_corners, widths, heights = (
        t[order] for t in (b_idx, f_idx, j0, i0, coef, depth_corners, widths, heights)
    )
    sides = torch.maximum(widths, heights)

    pixel_ids, depths, faces, barys = [], [], [], []
    start = 0
    while start < len(b_idx):
        # Grow the chunk (doubling) while its padded size fits the budget.
        stop, step = start + 1, 1
        while stop < len(b_idx):
            nxt = min(stop + step, len(b_idx))
            if (nxt - start) * int(sides[nxt - 1]) ** 2 > chunk_pixels:
                break
            stop, step = nxt, step * 2
        chunk = slice(start, stop)
        bw, bh = int(widths[chunk].max()), int(heights[chunk].max())
        dx = torch.arange(bw, device=device, dtype=dtype)
        dy = torch.arange(bh, device=device, dtype=dtype)
        a, b, c = coef[chunk].unbind(-1)  # (n, 3) each
        weights = [
            a[:, k, None, None] * dx + (b[:, k, None] * dy + c[:, k, None])[:, :, None]
            for k in range(3)
        ]
        # A small tolerance so that pixels on a shared edge are never lost to rounding.
        inside = torch.minimum(weights[0], torch.minimum(weights[1], weights[2])) >= -1e-5
        inside &= dx < widths[chunk, None, None]
        inside &= (dy < heights[chunk, None])[:, :, None]
        n_idx, r_idx, c_idx = inside.nonzero(as_tuple=True)
        n_idx = n_idx + start
        offsets = torch.stack(
            [c_idx.to(dtype), r_idx.to(dtype), torch.ones_like(c_idx, dtype=dtype)], -1
        )
        bary = (coef[n_idx] * offsets[:, None, :]).sum(-1)
        pixel_ids.append((b_idx[n_idx] * h + i0[n_idx] + r_idx) * w + j0[n_idx] + c_idx)
        depths.append((bary * depth_corners[n_idx]).sum(-1))
        faces.append(f_idx[n_idx])
        barys.append(bary)
        start = stop

    total = batch * h * w
    face_index = torch.full((total,), -1, dtype=torch.long, device=device)
    barycentric = torch.zeros(total, 3, dtype=dtype, device=device)
    if pixel_ids:
        pixel_id, depth = torch.cat(pixel_ids), torch.cat(depths)
        face, bary = torch.cat(faces), torch.cat(barys)
        zbuffer = torch.full((total,), float("inf"), dtype=dtype, device=device)
        zbuffer.scatter_reduce_(0, pixel_id, depth, reduce="amin")
        nearest = depth <= zbuffer[pixel_id]
        no_face = torch.iinfo(torch.long).max
        winner = torch.full((total,), no_face, dtype=torch.long, device=device)
        winner.scatter_reduce_(0, pixel_id[nearest], face[nearest], reduce="amin")
        chosen = nearest & (face == winner[pixel_id])
        bary = bary[chosen].clamp(0.0, 1.0)
        face_index[pixel_id[chosen]] = face[chosen]
        barycentric[pixel_id[chosen]] = bary / bary.sum(-1, keepdim=True).clamp_min(1e-12)
    return Rasterization(face_index.view(batch, h, w), barycentric.view(batch, h, w, 3))


@torch.no_grad()
def render_ncc(
    vertices_px: torch.Tensor,
    triangles: torch.Tensor,
    vertex_colors: torch.Tensor,
    image_size: int | tuple[int, int],
    *,
    shading: str = "smooth",
    return_mask: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The NCC image ``(B, 3, H, W)`` in [0, 1] (background 0) of meshes ``(B, V, 3)`` in pixels.

    ``vertex_colors`` ``(V, 3)`` are the mean shape's normalised coordinates
    (``MorphableModel.vertex_colors``). ``shading``: ``"smooth"`` (colour of the visible surface
    point) or ``"flat"`` (colour of the visible triangle's centre, Sec. 4.1). With
    ``return_mask`` also the ``(B, 1, H, W)`` coverage mask (float, 1 on the face).
    Not differentiable.
    """
    if shading not in _SHADINGS:
        raise InputError(f"shading must be one of {_SHADINGS}, got {shading!r}")
    if vertex_colors.dim() != 2 or vertex_colors.shape != (vertices_px.shape[1], 3):
        raise InputError(
            f"vertex_colors must have shape ({vertices_px.shape[1]}, 3), got {tuple(vertex_colors.shape)}"
        )
    raster = rasterize(vertices_px, triangles, image_size)
    triangles = torch.as_tensor(triangles, device=vertices_px.device).long()
    colors = vertex_colors.to(raster.barycentric)
    batch, h, w = raster.face_index.shape
    faces = raster.face_index.view(-1)
    covered = (faces >= 0).nonzero(as_tuple=True)[0]
    corner_colors = colors[triangles[faces[covered]]]  # (P, 3 corners, 3 channels)
    if shading == "smooth":
        values = (raster.barycentric.view(-1, 3)[covered, :, None] * corner_colors).sum(-2)
    else:
        values = corner_colors.mean(-2)
    image = colors.new_zeros(batch * h * w, 3)
    image[covered] = values
    image = image.view(batch, h, w, 3).permute(0, 3, 1, 2).contiguous()
    return (image, raster.mask) if return_mask else image
