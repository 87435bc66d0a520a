"""Data for Faceptor: every dataset of the task table in its native format, the paper's augmentations, the
multi-task batch composer and the built-in synthetic faces. This module is the public entry point; the pieces
live in one file per concept and are re-exported here (formats, splits, labels: docs/datasets.md; tasks,
normalisation and augmentations: docs/design.md sections 1, 2, 7, 8):

  dataset_io.py      errors, image / text / .mat reading, the FaceDataset base class
  loaders_dense.py   300W, WFLW, COFW, AFLW-19, CelebAMask-HQ, LaPa
  loaders_global.py  MORPH II, UTKFace, AffectNet, RAF-DB, FERPlus, CelebA, LFW-73, MS1MV3
  loaders_pose.py    head pose: 300W-LP, AFLW2000-3D, PoseTransform         (task types beyond the paper)
  loaders_extra.py   gender / race: UTKFace, FairFace; landmark visibility: COFW
  recordio.py        RecordIO without mxnet, verification .bin reader
  transforms.py      FaRL-style dense warps with inverse, 112-px pipeline
  composer.py        InfiniteSampler, MultiTaskComposer (worker pools: shared or per head), normalisation
  synthetic.py       SyntheticFaces (with synthetic_draw.py; labels beyond the paper and the transfer schemes
                     aflw19 / cofw / lapa / synth_attr in synthetic_labels.py)
  conventions.py     class orders, flip permutations, expression remaps, attribute names

Usage:
    ds = build_dataset("300w", "/data/300W", "train", transform=default_transform("300w", train=True))
    item = ds.get(0, seed=123)          # augmentation seeded per item; ds[i] seeds with i
Divergences from the paper are listed in each module's docstring.
"""
from .composer import InfiniteSampler, MultiTaskComposer, collate, item_seed, normalize_images  # noqa: F401
from .conventions import (CELEBA_ATTRIBUTES, CELEBAMASK_CLASSES, CELEBAMASK_FLIP, EXPRESSIONS,  # noqa: F401
                         LANDMARK_FLIP, LAPA_CLASSES, LAPA_FLIP, NORMALIZATION, input_group)
from .dataset_io import DatasetError, DatasetMissing, FaceDataset, decode_image  # noqa: F401
from .loaders_dense import AFLW19, COFW, LaPa, CelebAMaskHQ, W300, WFLW  # noqa: F401
from .loaders_global import AffectNet, CelebA, FERPlus, LFW73, MS1MV3, Morph2, RAFDB, UTKFace  # noqa: F401
from .loaders_extra import COFWVisibility, FairFace, UTKFaceDemographics  # noqa: F401
from .loaders_pose import AFLW2000, PoseTransform, W300LP, flip_pose, nose_direction, pose_rotation  # noqa: F401
from .recordio import RecordIOReader, read_verification_bin  # noqa: F401
from .synthetic import SCHEMES as SYNTHETIC_SCHEMES, SyntheticFaces  # noqa: F401
from .synthetic_labels import SYNTH_ATTRIBUTES  # noqa: F401
from .transforms import DenseTransform, GlobalTransform, Warp, flip_item, rand_augment, random_erasing  # noqa: F401

# task head (a key of model.TASKS) -> (loader, splits, task type)
DATASETS = {
    "300w": (W300, ("train", "common", "challenge", "full", "test"), "landmarks"),
    "wflw": (WFLW, ("train", "test", "test_largepose", "test_expression", "test_illumination", "test_makeup",
                    "test_occlusion", "test_blur"), "landmarks"),
    "cofw": (COFW, ("train", "test"), "landmarks"),
    "aflw19": (AFLW19, ("train", "test", "frontal"), "landmarks"),
    "celebamask_hq": (CelebAMaskHQ, ("train", "val", "train_val", "test"), "parsing"),
    "lapa": (LaPa, ("train", "val", "train_val", "test"), "parsing"),
    "morph2": (Morph2, ("train", "test"), "age"),
    "utkface": (UTKFace, ("train", "test"), "age"),
    "affectnet": (AffectNet, ("train", "test"), "expression"),
    "rafdb": (RAFDB, ("train", "test"), "expression"),
    "ferplus": (FERPlus, ("train", "val", "train_val", "test"), "expression"),
    "celeba": (CelebA, ("train", "val", "trainval", "test"), "attributes"),
    "lfw73": (LFW73, ("train", "test", "all"), "attributes"),
    "ms1mv3": (MS1MV3, ("train",), "recognition"),
    # task types beyond the paper
    "300wlp": (W300LP, ("train",), "pose"),
    "aflw2000": (AFLW2000, ("test",), "pose"),
    "cofw_visibility": (COFWVisibility, ("train", "test"), "visibility"),
    "utkface_gender": (UTKFaceDemographics, ("train", "test"), "gender"),
    "utkface_race": (UTKFaceDemographics, ("train", "test"), "race"),
    "fairface_gender": (FairFace, ("train", "val", "test"), "gender"),
    "fairface_race": (FairFace, ("train", "val", "test"), "race"),
}
# test sets read by a task head of another name: dataset -> head (model.TASKS key)
EVAL_HEAD = {"aflw2000": "300wlp"}
# task heads whose only data are the built-in synthetic faces (a transfer scheme with no real dataset)
SYNTHETIC_ONLY = ("synth_attr",)


def build_dataset(name: str, root: str, split: str, transform=None, **kwargs):
    """The dataset `name` (a key of DATASETS) read from its top folder `root` as distributed.

    With transform=None items are untransformed dicts (see the loader modules); a transform is a callable
    (item, torch.Generator) -> item such as `default_transform(name, train)`. Extra keyword arguments go to the
    loader (e.g. `skip_corrupt=True`, AFLW-19 `n_train`, MORPH II / UTKFace `test_fold`, 300W-LP `flipped`,
    AFLW2000-3D / 300W-LP `max_angle`, UTKFace gender / race `strict`).
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    cls, _, _ = DATASETS[name]
    return cls(root, split, transform=transform, **kwargs)


def default_transform(name: str, train: bool, size: int = None):
    """The paper's augmentation for dataset `name` (docs/design.md section 8); evaluation only aligns/resizes."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    task = DATASETS[name][2]
    if task == "pose":                      # crop around the landmarks; flips negate yaw and roll; no rotation
        return PoseTransform(size or 112, train)
    if task == "visibility":                # COFW crops as for landmarks, without the synthetic occluder box
        return DenseTransform(size or 512, "landmarks", train, align="box", occlusion=False)
    if task == "landmarks":
        return DenseTransform(size or 512, "landmarks", train, align="box", scale_mu=1.0 if name == "aflw19" else 0.8)
    if task == "parsing":
        if name == "lapa":
            return DenseTransform(size or 512, "parsing", train, align="points5", warp_factor=0.8)
        return DenseTransform(size or 512, "parsing", train, align="image")
    return GlobalTransform(size or 112, train, kind="recognition" if task == "recognition" else "attributes")
