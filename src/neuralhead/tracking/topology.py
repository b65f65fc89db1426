"""Index sets of the 478-point face mesh (468 surface points + 10 iris points).

Indices follow mediapipe's face mesh. "Right" and "left" are the subject's own sides:
the subject's right eye appears on the image's left.
"""

from __future__ import annotations

NUM_LANDMARKS = 478
NUM_MESH = 468  # surface points; 468..477 are the iris points

RIGHT_IRIS_CENTER = 468
LEFT_IRIS_CENTER = 473
RIGHT_IRIS = (468, 469, 470, 471, 472)
LEFT_IRIS = (473, 474, 475, 476, 477)

# Eye contours, corner to corner (outer, ..., inner), upper and lower lid.
RIGHT_EYE_UPPER = (33, 246, 161, 160, 159, 158, 157, 173, 133)
RIGHT_EYE_LOWER = (33, 7, 163, 144, 145, 153, 154, 155, 133)
LEFT_EYE_UPPER = (263, 466, 388, 387, 386, 385, 384, 398, 362)
LEFT_EYE_LOWER = (263, 249, 390, 373, 374, 380, 381, 382, 362)
RIGHT_EYE_CORNERS = (33, 133)  # outer, inner
LEFT_EYE_CORNERS = (263, 362)

RIGHT_EYEBROW = (46, 52, 53, 55, 63, 65, 66, 70, 105, 107)
LEFT_EYEBROW = (276, 282, 283, 285, 293, 295, 296, 300, 334, 336)

# Lip contours from the right mouth corner (61 outer / 78 inner) to the left one.
LIPS_OUTER_UPPER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291)
LIPS_OUTER_LOWER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291)
LIPS_INNER_UPPER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LIPS_INNER_LOWER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
MOUTH_CORNERS = (61, 291)

FACE_OVAL = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
    152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
)  # fmt: skip
JAW = (361, 288, 397, 365, 379, 378, 400, 377, 152, 148, 176, 149, 150, 136, 172, 58, 132)

NOSE_TIP = 1
CHIN = 152
FOREHEAD = 10

# Points that barely move with expression (forehead, nose bridge and tip, temples, eye
# corners): the rigid head pose is fitted to these only, so that an open mouth or a raised
# brow is not mistaken for a head rotation. Our selection.
RIGID = (
    1, 2, 4, 5, 6, 8, 9, 10, 94, 98, 151, 168, 195, 197, 327,
    21, 54, 67, 103, 109, 127, 162, 251, 284, 297, 332, 338, 356, 389,
    33, 133, 263, 362, 234, 454,
)  # fmt: skip
