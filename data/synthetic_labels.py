"""Labels of the built-in synthetic faces beyond the paper's six task types, and their transfer label schemes.

Not in the paper. Every label here is read from the parameters that drew the face (synthetic.py, synthetic_draw.py),
so it is exact to within the rasterisation of polygon edges; none is a random draw of its own, so the images and
the labels of the existing tasks are unchanged.

Task types beyond the paper (conventions at the end of conventions.py):
  pose     (yaw, pitch, roll) degrees. The renderer's yaw-like shift `yaw` moves the features to image right
           (about sin of the turn at depth 1), which in the 300W-LP convention is a turn to the subject's left, so
           yaw = -asin(shift); its in-plane rotation `rot` is clockwise for rot > 0 (x right, y down), as roll is:
           roll = +rot. The renderer has no pitch: pitch = 0.
  visible  1 / 0 per landmark: 0 when the point lies under a shape drawn over the features: the occluders (bars,
           hand-like blobs), sunglasses lenses, a hat, the hair on top of the head (bangs, hairline), sideburns,
           a moustache or a goatee (which covers the chin point). Stubble and clear glasses' frames are shading
           and thin lines, not cover. Hair behind the head, neck and clothes are drawn under the face.
  gender   0 male, 1 female: the identity's sex, drawn as beards, short hair, a square jaw, thick brows, make-up.
  race     a stand-in, not a model of real populations: the identity's skin-tone band floor(5 * skin_t), 0 darkest
           .. 4 lightest (skin_t is the identity's skin tone in [0, 1]; nothing else in the drawing depends on the
           band). It is used as the class id of a 5-class race head (utkface_race) and carries none of UTKFace's
           category names.

Transfer label schemes (paper Sec. 4.4, Table 9, in spirit): the same drawn faces labelled in a scheme that a
stage-1 model trained on the 68 points, the 19 CelebAMask-HQ classes and the 40 CelebA attributes never saw:
  aflw19           19 landmarks (AFLW-19 layout) from the 68 by AFLW19_FROM_68;
  cofw,            29 landmarks (COFW layout) from the 68 by COFW29_FROM_68; the visibility of each of the 29 points
  cofw_visibility  is tested at the mapped point itself;
  lapa             LaPa's 11 parsing classes from the 19 drawn classes by LAPA_FROM_CELEBAMASK;
  synth_attr       SYNTH_ATTRIBUTES, attributes the drawing shows that CelebA's 40 do not name.
A point map lists, for each new point, the 68-point indices (0-based) whose mean it is; a single index picks a
drawn point, a mean of several gives a centre the 68 do not contain (an eye centre is the mean of its six contour
points, which is the drawn iris centre up to the curvature of the yaw warp).
"""
import math

import numpy as np

from .conventions import EXPRESSIONS
from .synthetic_draw import ellipse, extra_shapes, face_geometry, to_pixels

# --- pose, gender, race -------------------------------------------------------------------------------------------

RACE_BANDS = 5


def pose_of(p: dict) -> np.ndarray:
    """(yaw, pitch, roll) in degrees of a drawn face (module docstring for the signs)."""
    return np.array([-math.degrees(math.asin(p["yaw"])), 0.0, math.degrees(math.atan2(p["sin"], p["cos"]))])


def gender_of(p: dict) -> int:
    return 0 if p["male"] else 1


def race_of(p: dict) -> int:
    return min(int(p["skin_t"] * RACE_BANDS), RACE_BANDS - 1)


# --- visibility ---------------------------------------------------------------------------------------------------

def occluding_polygons(p: dict, size: int) -> list:
    """Pixel polygons [K, 2] of every shape drawn over the landmark features (module docstring), each pushed
    through the renderer's warp at the yaw depth it is drawn with."""
    g = face_geometry(p)
    sh = extra_shapes(p, g)
    polys = []
    for name, depth in (("hair_top", 0.4), ("sideburn_l", 0.3), ("sideburn_r", 0.3), ("hat", 0.2),
                        ("mustache", 1.0), ("goatee", 1.0)):
        if name in sh:
            polys.append(to_pixels(sh[name], p, depth))
    if p["sunglasses"]:
        for e in (g["eye_l"], g["eye_r"]):
            c = e.mean(0)
            polys.append(to_pixels(ellipse(c[0], c[1] - 0.01, p["eye_w"] * 1.45, 0.15), p, 1.0))
    polys += [pts * size for pts, _ in p["occluders"]]
    return polys


def inside(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd rule: which of points [N, 2] lie inside the closed polygon [K, 2] (bool [N])."""
    x, y = points[:, 0:1], points[:, 1:2]                                     # [N, 1]
    x0, y0 = polygon[:, 0], polygon[:, 1]                                     # [K]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    crosses = (y0 > y) != (y1 > y)                                            # [N, K] edge spans the point's row
    with np.errstate(divide="ignore", invalid="ignore"):
        xc = x0 + (y - y0) * (x1 - x0) / (y1 - y0)                            # [N, K] edge x at that row
    return (crosses & (x < xc)).sum(1) % 2 == 1


def visibility(points: np.ndarray, polygons: list) -> np.ndarray:
    """1 / 0 per point [N]: 0 when inside any of `polygons`."""
    covered = np.zeros(len(points), bool)
    for poly in polygons:
        covered |= inside(points, poly)
    return (~covered).astype(np.int64)


# --- transfer schemes ---------------------------------------------------------------------------------------------

EYE_L, EYE_R = tuple(range(36, 42)), tuple(range(42, 48))
# AFLW-19 (1-based in its documentation): 1-3 / 4-6 brows (outer, centre, inner), 7-9 / 10-12 eyes (corner, centre,
# corner), 13-15 nose (side, tip, side), 16-18 mouth (corner, centre, corner), 19 chin; image-left parts first.
AFLW19_FROM_68 = ((17,), (19,), (21,), (22,), (24,), (26,), (36,), EYE_L, (39,), (42,), EYE_R, (45,),
                  (31,), (30,), (35,), (48,), (62, 66), (54,), (8,))
# COFW (1-based): 1/2 outer and 3/4 inner brow corners, 5/6 and 7/8 the upper and lower middle of each brow (both
# the brow's centre line here), 9/10 outer and 11/12 inner eye corners, 13-16 upper and lower lid middles, 17/18
# pupils, 19/20 nose sides, 21 nose tip, 22 below the nose, 23/24 mouth corners, 25-28 the upper lip's top and
# bottom and the lower lip's top and bottom middles, 29 chin.
COFW29_FROM_68 = ((17,), (26,), (21,), (22,), (19,), (19,), (24,), (24,), (36,), (45,), (39,), (42,),
                  (37, 38), (40, 41), (43, 44), (46, 47), EYE_L, EYE_R, (31,), (35,), (30,), (33,),
                  (48,), (54,), (51,), (62,), (66,), (57,), (8,))
POINT_MAPS = {"aflw19": AFLW19_FROM_68, "cofw": COFW29_FROM_68, "cofw_visibility": COFW29_FROM_68}

# LaPa class (conventions.LAPA_CLASSES) of each drawn CelebAMask-HQ class (conventions.CELEBAMASK_CLASSES). LaPa
# has no neck, cloth, glasses, hat or jewellery: neck, cloth, hat, earrings and necklace are background; glasses
# (frames, sunglasses lenses) count as the skin they sit on; the ears belong to LaPa's skin class (face_lr_rr).
# Sides: the image-left brow and eye (CelebAMask-HQ values 6, 8) are LaPa's left ones (2, 4), as LaPa's landmark
# files name the image-left eye centre (point 104) first.
LAPA_FROM_CELEBAMASK = (0, 0, 1, 0, 1, 1, 2, 3, 4, 5, 6, 8, 9, 7, 10, 1, 0, 0, 0)

# Attributes the drawing shows that CelebA's 40 do not name (names in the style of LFW-73's).
SYNTH_ATTRIBUTES = ("Child", "Senior", "Sunglasses", "Frowning", "Mouth_Wide_Open", "Teeth_Visible",
                    "Strong_Nose_Mouth_Lines", "Obstructed_Forehead", "Long_Hair", "Harsh_Lighting",
                    "Occluded_Face")


def synth_attributes_of(p: dict) -> np.ndarray:
    """SYNTH_ATTRIBUTES (1/0) of a drawn face, from the parameters that drew it."""
    v = {"Child": p["age"] < 15.0,                                    # child proportions are drawn below 15
         "Senior": p["age"] >= 60.0,
         "Sunglasses": p["sunglasses"],
         "Frowning": EXPRESSIONS[p["expression"]] == "anger",          # brows pulled down and together
         "Mouth_Wide_Open": p["mouth_open"] > 0.3,                    # surprise (fear opens to at most 0.22)
         "Teeth_Visible": p["teeth"],
         "Strong_Nose_Mouth_Lines": p["nasolabial"],
         "Obstructed_Forehead": p["hat"] or (p["bangs"] and not p["bald"]),
         "Long_Hair": p["hair_len"] > 0 and not p["bald"],
         "Harsh_Lighting": p["light_grad"] > 0.25,
         "Occluded_Face": len(p["occluders"]) > 0}
    return np.array([int(bool(v[name])) for name in SYNTH_ATTRIBUTES], dtype=np.int64)


def map_points(landmarks: np.ndarray, point_map) -> np.ndarray:
    """[68, 2] -> [K, 2]: each new point the mean of the 68-point indices its entry lists."""
    return np.stack([landmarks[list(idx)].mean(0) for idx in point_map])


def map_classes(mask: np.ndarray, class_map=LAPA_FROM_CELEBAMASK) -> np.ndarray:
    """A mask of drawn (CelebAMask-HQ) class values -> the target scheme's class values."""
    return np.asarray(class_map, dtype=mask.dtype)[mask]
