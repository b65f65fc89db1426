"""Build the triangles of the tracker's face mesh, shipped in neuralhead/headgan/data/.

mediapipe lists its face mesh (``FACEMESH_TESSELATION`` in
``mediapipe.python.solutions.face_mesh_connections``, Apache-2.0) as 2556 directed edges
(1322 undirected ones) between the 468 surface points, not as triangles. The triangles are
recovered here:

1. Every 3-clique of the edge graph is a candidate (854 of them).
2. A clique none of whose edges is a mesh boundary but each of whose edges is shared by
   three cliques is the outline of a fan around a degree-3 vertex, not a face: dropped.
   What remains is checked to be a manifold disc with three holes (Euler characteristic
   V - E + F = -2, every edge in one or two faces, four boundary loops: the face oval, the
   inner lip contour and the two eye openings): 852 faces.
3. The eye openings (lid contours) and the mouth opening (inner lip contour) are closed by
   zipping their upper and lower contours, always taking the shorter diagonal on the
   template: 14 triangles per eye and 18 for the mouth, 898 in all, which is the count of
   mediapipe's canonical face model.
4. All triangles are oriented consistently, with normals ``(p1 - p0) x (p2 - p0)`` pointing
   out of the face (towards the camera, -z, on the frontal template).

Run once; the result is committed:  python scripts/build_face_mesh_triangles.py
"""

from __future__ import annotations

import collections
import contextlib
import io
from itertools import combinations
from pathlib import Path

import numpy as np

from neuralhead.tracking import topology as T
from neuralhead.tracking.template import load_template

OUT = Path(__file__).resolve().parents[1] / "src/neuralhead/headgan/data/face_mesh_triangles.npz"


def tessellation_edges() -> set[tuple[int, int]]:
    with contextlib.redirect_stderr(io.StringIO()):
        from mediapipe.python.solutions.face_mesh_connections import FACEMESH_TESSELATION
    return {tuple(sorted(edge)) for edge in FACEMESH_TESSELATION}


def surface_triangles(edges: set[tuple[int, int]]) -> list[tuple[int, int, int]]:
    neighbours = collections.defaultdict(set)
    for a, b in edges:
        neighbours[a].add(b)
        neighbours[b].add(a)
    cliques = {tuple(sorted((a, b, c))) for a, b in edges for c in neighbours[a] & neighbours[b]}
    per_edge = collections.Counter(e for tri in cliques for e in combinations(tri, 2))
    faces = [
        tri for tri in sorted(cliques) if not all(per_edge[e] == 3 for e in combinations(tri, 2))
    ]
    used = collections.Counter(e for tri in faces for e in combinations(tri, 2))
    num_vertices = len({v for e in edges for v in e})
    assert set(used) == edges, "every tessellation edge must belong to a face"
    assert max(used.values()) == 2, "the surface must be a manifold"
    assert num_vertices - len(edges) + len(faces) == -2, "a disc with three holes"
    return faces


def boundary_loops(faces: list[tuple[int, int, int]]) -> list[set[int]]:
    used = collections.Counter(e for tri in faces for e in combinations(sorted(tri), 2))
    graph = collections.defaultdict(set)
    for (a, b), count in used.items():
        if count == 1:
            graph[a].add(b)
            graph[b].add(a)
    loops, seen = [], set()
    for start in sorted(graph):
        if start in seen:
            continue
        loop, stack = set(), [start]
        while stack:
            v = stack.pop()
            if v not in loop:
                loop.add(v)
                stack.extend(graph[v] - loop)
        seen |= loop
        loops.append(loop)
    return loops


def zip_contours(
    upper: tuple[int, ...], lower: tuple[int, ...], points: np.ndarray
) -> list[tuple[int, int, int]]:
    """Triangulate the opening between two contours that share their first and last points."""
    assert upper[0] == lower[0] and upper[-1] == lower[-1]
    i, j, triangles = 1, 1, [(upper[0], upper[1], lower[1])]
    while i < len(upper) - 2 or j < len(lower) - 2:
        advance_upper = j == len(lower) - 2 or (
            i < len(upper) - 2
            and np.linalg.norm(points[upper[i + 1]] - points[lower[j]])
            <= np.linalg.norm(points[lower[j + 1]] - points[upper[i]])
        )
        if advance_upper:
            triangles.append((upper[i], upper[i + 1], lower[j]))
            i += 1
        else:
            triangles.append((upper[i], lower[j + 1], lower[j]))
            j += 1
    triangles.append((upper[i], upper[-1], lower[j]))
    return triangles


def orient(faces: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Consistent winding across shared edges, then normals towards -z on the frontal template."""
    faces = faces.copy()
    by_edge = collections.defaultdict(list)
    for f, tri in enumerate(faces):
        for a, b in combinations(sorted(tri), 2):
            by_edge[(a, b)].append(f)
    done = np.zeros(len(faces), bool)
    for seed in range(len(faces)):
        if done[seed]:
            continue
        done[seed] = True
        queue = [seed]
        while queue:
            f = queue.pop()
            directed = {(faces[f][k], faces[f][(k + 1) % 3]) for k in range(3)}
            for a, b in combinations(sorted(faces[f]), 2):
                for g in by_edge[(a, b)]:
                    if done[g]:
                        continue
                    other = {(faces[g][k], faces[g][(k + 1) % 3]) for k in range(3)}
                    if directed & other:  # a shared edge run the same way: flip the neighbour
                        faces[g] = faces[g][[0, 2, 1]]
                    done[g] = True
                    queue.append(g)
    p = points[faces]
    normal_z = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])[:, 2]
    if (normal_z > 0).sum() > (normal_z < 0).sum():
        faces = faces[:, [0, 2, 1]]
    return faces


def main() -> None:
    points = load_template().vertices.astype(np.float64)
    surface = surface_triangles(tessellation_edges())
    loops = sorted(boundary_loops(surface), key=len)
    right_eye = set(T.RIGHT_EYE_UPPER) | set(T.RIGHT_EYE_LOWER)
    left_eye = set(T.LEFT_EYE_UPPER) | set(T.LEFT_EYE_LOWER)
    mouth = set(T.LIPS_INNER_UPPER) | set(T.LIPS_INNER_LOWER)
    assert sorted(map(sorted, loops)) == sorted(
        map(sorted, [right_eye, left_eye, mouth, set(T.FACE_OVAL)])
    )
    eyes = zip_contours(T.RIGHT_EYE_UPPER, T.RIGHT_EYE_LOWER, points) + zip_contours(
        T.LEFT_EYE_UPPER, T.LEFT_EYE_LOWER, points
    )
    lips = zip_contours(T.LIPS_INNER_UPPER, T.LIPS_INNER_LOWER, points)
    groups = [len(surface), len(eyes), len(lips)]
    assert groups == [852, 28, 18], groups
    everything = orient(np.array(surface + eyes + lips, np.int64), points)
    surface_out, eyes_out, mouth_out = np.split(everything, np.cumsum(groups)[:-1])
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        OUT,
        surface=surface_out.astype(np.int16),
        eyes=eyes_out.astype(np.int16),
        mouth=mouth_out.astype(np.int16),
    )
    print(
        f"wrote {OUT}: {len(surface_out)} surface, {len(eyes_out)} eye and {len(mouth_out)} mouth triangles"
    )


if __name__ == "__main__":
    main()
