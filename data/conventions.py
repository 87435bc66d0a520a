"""Label conventions shared by the loaders, the synthetic faces and the transforms.

Every table here is documented in docs/datasets.md (the dataset named in the comment) or docs/design.md:
class orders, landmark flip permutations, expression remaps, the 40 CelebA attribute names and the
per-input-group normalisation. Nothing here is computed; tests check the tables against their documented
properties (involutions, remap bijections). The tables of the task types beyond the paper (head pose, landmark
visibility, gender, race) are at the end; they follow the datasets' own documentation (300W-LP, UTKFace, FairFace).
"""

# --- Expressions (docs/datasets.md): AffectNet order is the canonical order of every expression head.
EXPRESSIONS = ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger")
RAFDB_TO_AFFECTNET = {1: 3, 2: 4, 3: 5, 4: 1, 5: 2, 6: 6, 7: 0}          # RAF-DB label 1..7 -> AffectNet id
FERPLUS_TO_AFFECTNET = {0: 0, 1: 1, 2: 3, 3: 2, 4: 6, 5: 5, 6: 4, 7: 7}   # FER+ column -> AffectNet id (7 = contempt)
FER2013_TO_AFFECTNET = {0: 6, 1: 5, 2: 4, 3: 1, 4: 2, 5: 3, 6: 0}         # original FER2013 emotion id -> AffectNet id
FERPLUS_COLUMNS = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt",
                   "unknown", "NF")

# --- CelebA attributes (docs/datasets.md, CelebA), index 0..39.
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips", "Big_Nose",
    "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses",
    "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks",
    "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick",
    "Wearing_Necklace", "Wearing_Necktie", "Young")
ATTR = {name: i for i, name in enumerate(CELEBA_ATTRIBUTES)}

# --- Parsing classes. CelebAMask-HQ in the FaRL/Faceptor painting order (docs/datasets.md): value k = position.
CELEBAMASK_CLASSES = ("background", "neck", "face", "cloth", "rr", "lr", "rb", "lb", "re", "le", "nose", "imouth",
                      "llip", "ulip", "hair", "glass", "hat", "earr", "neckl")
# mask-file part name -> class value; painting goes in increasing class value (a later part overwrites).
CELEBAMASK_PARTS = {"neck": 1, "skin": 2, "cloth": 3, "l_ear": 4, "r_ear": 5, "l_brow": 6, "r_brow": 7, "l_eye": 8,
                    "r_eye": 9, "nose": 10, "mouth": 11, "l_lip": 12, "u_lip": 13, "hair": 14, "eye_g": 15, "hat": 16,
                    "ear_r": 17, "neck_l": 18}
CELEBAMASK_FLIP = (0, 1, 2, 3, 5, 4, 7, 6, 9, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18)   # 4<->5, 6<->7, 8<->9
LAPA_CLASSES = ("background", "face_lr_rr", "lb", "rb", "le", "re", "nose", "ul", "im", "ll", "hair")
LAPA_FLIP = (0, 1, 3, 2, 5, 4, 6, 7, 8, 9, 10)                                             # 2<->3, 4<->5
LAPA_ALIGN_POINTS = (104, 105, 54, 84, 90)      # eye centres, nose tip, mouth corners (LaPa's 106 points)

# --- Landmark flip permutations (0-based, docs/datasets.md): new[i] = old[p[i]] after mirroring x.
FLIP_68 = (16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17,
           27, 28, 29, 30, 35, 34, 33, 32, 31, 45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40,
           54, 53, 52, 51, 50, 49, 48,
           59, 58, 57, 56, 55, 64, 63, 62, 61, 60, 67, 66, 65)
FLIP_98 = (32, 31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6,
           5, 4, 3, 2, 1, 0, 46, 45, 44, 43, 42, 50, 49, 48, 47, 37, 36, 35, 34, 33, 41, 40, 39, 38, 51, 52, 53, 54,
           59, 58, 57, 56, 55, 72, 71, 70, 69, 68, 75, 74, 73, 64, 63, 62, 61, 60, 67, 66, 65,
           82, 81, 80, 79, 78, 77, 76,
           87, 86, 85, 84, 83, 92, 91, 90, 89, 88, 95, 94, 93, 97, 96)
FLIP_29 = (1, 0, 3, 2, 6, 7, 4, 5, 9, 8, 11, 10, 14, 15, 12, 13, 17, 16, 19, 18, 20, 21, 23, 22, 24, 25, 26, 27, 28)
FLIP_19 = (5, 4, 3, 2, 1, 0, 11, 10, 9, 8, 7, 6, 14, 13, 12, 17, 16, 15, 18)
LANDMARK_FLIP = {68: FLIP_68, 98: FLIP_98, 29: FLIP_29, 19: FLIP_19}

# --- Input groups and normalisation (docs/design.md): 512-px (dense) tasks use CLIP statistics, 112-px 0.5/0.5.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)
TASK_TYPES = ("landmarks", "parsing", "age", "expression", "attributes", "recognition")
EXTRA_TASK_TYPES = ("pose", "visibility", "gender", "race")          # beyond the paper (tables at the end)
DENSE_TYPES = ("landmarks", "parsing", "visibility")     # visibility reads the 512-px landmark crops
NORMALIZATION = {"dense": (CLIP_MEAN, CLIP_STD), "global": (HALF_MEAN, HALF_STD)}


def input_group(task_type: str) -> str:
    """'dense' (512-px group: landmarks, parsing) or 'global' (112-px group: everything else)."""
    if task_type not in TASK_TYPES + EXTRA_TASK_TYPES:
        raise ValueError(f"unknown task type {task_type!r}; expected one of {TASK_TYPES + EXTRA_TASK_TYPES}")
    return "dense" if task_type in DENSE_TYPES else "global"


# --- Task types beyond the paper: head pose, landmark visibility, gender, race.
# Head pose: `pose` = (yaw, pitch, roll) in degrees, in the convention of 300W-LP / AFLW2000-3D `Pose_Para`
# (stored there as radians in the order pitch, yaw, roll). Seen in the image (x right, y down):
#   yaw   > 0: the face turns towards image left (the subject's own right); the nose tip moves left;
#   pitch > 0: the face looks up; the nose tip moves up;
#   roll  > 0: the face is rotated clockwise in the image plane.
# A horizontal flip negates yaw and roll and keeps pitch.
POSE_ANGLES = ("yaw", "pitch", "roll")
POSE_FLIP_SIGN = (-1.0, 1.0, -1.0)
# Gender: 0 male, 1 female (UTKFace's file-name code; FairFace's 'Male' / 'Female' map to the same ids).
GENDERS = ("male", "female")
UTKFACE_RACES = ("White", "Black", "Asian", "Indian", "Others")                 # UTKFace file-name race code 0..4
FAIRFACE_RACES = ("White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern")
FAIRFACE_GENDERS = ("Male", "Female")
FAIRFACE_AGE_GROUPS = ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "more than 70")
