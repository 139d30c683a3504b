"""Pedestrian attribute dataset readers in the formats the field publishes.

- ``pa100k``: ``annotation.mat`` (train/val/test_images_name, train/val/test_label, attributes; 80k/10k/10k)
  beside the images in ``data/`` (Rethinking_of_PAR) or ``release_data/release_data/`` (the official zip).
- ``peta``, ``rapv1``, ``rapv2``: Rethinking_of_PAR's ``dataset_all.pkl``; ``peta_zs`` and ``rap_zs``: its
  zero-shot-identity splits ``dataset_zs_run0.pkl`` (PETA folder / RAP2 folder). The pickle is an
  EasyDict with ``image_name``, ``label`` (N x all attributes), ``attr_name``, ``label_idx.eval``
  (the evaluated attributes, absent in some zero-shot files = all), ``partition.{train,val,trainval,test}``
  (an index array, or a list of 5 random partitions of which the first is the standard one) and
  ``root`` (the authors' image folder; images are looked up beside the pickle when it does not exist:
  ``images/`` for PETA, ``RAP_dataset/`` for RAP). RAP's label value 2 ("uncertain") becomes 0, as
  Rethinking_of_PAR does. It is unpickled without the ``easydict`` package, and only the names such a file
  holds are resolved (builtin containers, numpy arrays, EasyDict): a pickle naming anything else is refused.

Protocol (Rethinking_of_PAR / SOLIDER): train on ``trainval``, report on ``test``, evaluated attributes only.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ClaspError

PICKLE_DATASETS = {
    "peta": "dataset_all.pkl",
    "peta_zs": "dataset_zs_run0.pkl",
    "rapv1": "dataset_all.pkl",
    "rapv2": "dataset_all.pkl",
    "rap_zs": "dataset_zs_run0.pkl",
}
ATTR_DATASETS = ("pa100k", *PICKLE_DATASETS)
PA100K_IMAGE_DIRS = ("data", "release_data/release_data", "release_data", "images")
_PICKLE_IMAGE_DIRS = ("images", "RAP_dataset", "data", "release_data/release_data")
PA100K_KEYS = ("train_images_name", "val_images_name", "test_images_name", "train_label", "val_label", "test_label")


@dataclass
class AttrData:
    """Images, 0/1 labels of the evaluated attributes, and the index arrays of each split."""

    name: str
    root: Path
    layout: str
    image_paths: list[str]
    labels: np.ndarray  # (N, A) uint8
    attr_names: list[str]
    splits: dict[str, np.ndarray] = field(default_factory=dict)

    def split(self, name: str) -> tuple[list[str], np.ndarray]:
        if name not in self.splits:
            raise ClaspError(f"{self.name} has no '{name}' split; it has {sorted(self.splits)}")
        idx = self.splits[name]
        return [self.image_paths[i] for i in idx], self.labels[idx]

    def summary(self) -> dict[str, int]:
        return {"attributes": len(self.attr_names), **{f"{k}_images": len(v) for k, v in self.splits.items()}}


def load_attr_dataset(name: str, root: str | Path, *, pickle_file: str = "", partition: int = 0) -> AttrData:
    """Read dataset ``name`` (one of ATTR_DATASETS) from its folder ``root``; ClaspError names missing paths."""
    key = name.lower().replace("-", "_")
    root = Path(root)
    if not root.is_dir():
        raise ClaspError(f"attribute data folder {root} does not exist (pass --data pointing at the {name} folder)")
    if key == "pa100k":
        return _read_pa100k(root)
    if key in PICKLE_DATASETS:
        return _read_rethinking_pickle(key, root / (pickle_file or PICKLE_DATASETS[key]), partition)
    raise ClaspError(f"unknown attribute dataset '{name}': choose one of {', '.join(ATTR_DATASETS)}")


def _mat_strings(cell: Any) -> list[str]:
    """Strings of a MATLAB cell column as scipy.io.loadmat returns it (nested object arrays)."""
    out = []
    for item in np.asarray(cell, dtype=object).ravel():
        while isinstance(item, np.ndarray):
            item = item.ravel()[0] if item.size else ""
        out.append(str(item).strip())
    return out


def _read_pa100k(root: Path) -> AttrData:
    from scipy.io import loadmat

    mat_path = root / "annotation.mat"
    if not mat_path.is_file():
        alt = root / "annotation" / "annotation.mat"
        if not alt.is_file():
            raise ClaspError(f"{mat_path} not found: PA-100K needs annotation.mat beside its image folder")
        mat_path = alt
    try:
        mat = loadmat(str(mat_path))
    except Exception as exc:  # scipy raises several types for corrupt files
        raise ClaspError(f"{mat_path} is not a readable MATLAB file: {exc}") from None
    missing = [k for k in (*PA100K_KEYS, "attributes") if k not in mat]
    if missing:
        raise ClaspError(f"{mat_path} lacks PA-100K fields {missing}; is this PA-100K's annotation.mat?")
    image_dir = next((root / d for d in PA100K_IMAGE_DIRS if (root / d).is_dir()), None)
    if image_dir is None:
        raise ClaspError(f"no PA-100K image folder under {root}: expected one of {', '.join(PA100K_IMAGE_DIRS)}")
    names, labels, splits, offset = [], [], {}, 0
    for part in ("train", "val", "test"):
        part_names = _mat_strings(mat[f"{part}_images_name"])
        part_labels = np.asarray(mat[f"{part}_label"])
        if part_labels.shape[0] != len(part_names):
            raise ClaspError(f"{mat_path}: {len(part_names)} {part} images but {part_labels.shape[0]} label rows")
        names += part_names
        labels.append(part_labels)
        splits[part] = np.arange(offset, offset + len(part_names))
        offset += len(part_names)
    splits["trainval"] = np.concatenate([splits["train"], splits["val"]])
    attr_names = _mat_strings(mat["attributes"])
    label_matrix = np.concatenate(labels).astype(np.uint8)
    if label_matrix.shape[1] != len(attr_names):
        raise ClaspError(f"{mat_path}: {label_matrix.shape[1]} label columns but {len(attr_names)} attribute names")
    _check_first_image(image_dir, names[0], mat_path)
    layout = f"pa100k: annotation.mat + {image_dir.name}/ ({', '.join(f'{k} {len(v)}' for k, v in splits.items())})"
    paths = [str(image_dir / n) for n in names]
    return AttrData("pa100k", root, layout, paths, label_matrix, attr_names, splits)


class _AttrDict(dict):
    """Stand-in for easydict.EasyDict when unpickling: a dict whose keys read as attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


# Everything Rethinking_of_PAR's dataset pickles name (EasyDict trees of lists, str and numpy arrays,
# under numpy 1 and 2 module paths, any protocol). A pickle can name any callable and have it run while
# loading, and these files come from the internet, so every other name is refused.
_PICKLE_ALLOWED: dict[tuple[str, str], Any] = {
    ("easydict", "EasyDict"): _AttrDict,
    **{(f"numpy.{core}.multiarray", "_reconstruct"): None for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): None for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): None for core in ("core", "_core")},
    ("numpy", "ndarray"): None,
    ("numpy", "dtype"): None,
    **{
        (builtins, n): None
        for builtins in ("builtins", "__builtin__")  # protocol 0-2 use Python 2's module names
        for n in ("dict", "list", "tuple", "set", "frozenset", "bytearray", "complex")
    },
    ("copyreg", "_reconstructor"): None,  # protocol 0/1 rebuild of a dict subclass (EasyDict)
    ("copy_reg", "_reconstructor"): None,
    ("_codecs", "encode"): None,  # protocol 0-2 spell an array's bytes as encode(str, "latin1")
}


class _PickleReader(pickle.Unpickler):
    """Unpickles only the names in ``_PICKLE_ALLOWED``; anything else is a ``ClaspError`` naming it."""

    def __init__(self, fh: Any, source: Path) -> None:
        super().__init__(fh)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise ClaspError(
                f"{self.source} names {module}.{name}, which no Rethinking_of_PAR dataset pickle contains; "
                "refused to load it (unpickling it could run code): use the dataset's original file"
            )
        return _PICKLE_ALLOWED[module, name] or super().find_class(module, name)


def _read_rethinking_pickle(key: str, pkl_path: Path, partition: int) -> AttrData:
    if not pkl_path.is_file():
        raise ClaspError(
            f"{pkl_path} not found: {key} needs Rethinking_of_PAR's {pkl_path.name} in the dataset folder "
            "(made by its dataset/pedes_attr/preprocess/format_*.py or downloaded with the dataset)"
        )
    try:
        with open(pkl_path, "rb") as fh:
            info = _PickleReader(fh, pkl_path).load()
    except ClaspError:
        raise
    except Exception as exc:  # truncated / foreign pickles raise many types
        raise ClaspError(f"{pkl_path} is not a readable dataset pickle: {exc}") from None
    missing = [k for k in ("image_name", "label", "attr_name", "partition") if k not in info]
    if missing:
        raise ClaspError(f"{pkl_path} lacks fields {missing} of Rethinking_of_PAR's dataset description")
    labels = np.array(info["label"], copy=True)
    labels[labels == 2] = 0  # RAP's "uncertain"
    attr_names = [str(a) for a in info["attr_name"]]
    label_idx = info.get("label_idx")
    eval_idx = list(label_idx["eval"]) if label_idx and "eval" in label_idx else list(range(labels.shape[1]))
    labels = labels[:, eval_idx].astype(np.uint8)
    attr_names = [attr_names[i] for i in eval_idx]
    splits = {}
    for split_name, value in info["partition"].items():
        if isinstance(value, list | tuple):
            if not value:
                continue
            if partition >= len(value):
                raise ClaspError(f"{pkl_path}: partition {partition} requested but '{split_name}' has {len(value)}")
            value = value[partition]
        splits[split_name] = np.asarray(value, dtype=np.int64).ravel()
    for needed in ("trainval", "test"):
        if needed not in splits:
            raise ClaspError(f"{pkl_path}: partition has no '{needed}' split (has {sorted(splits)})")
    image_dir = _pickle_image_dir(pkl_path.parent, str(info.get("root", "")))
    names = [str(n) for n in info["image_name"]]
    _check_first_image(image_dir, names[int(splits["test"][0])], pkl_path)
    layout = (
        f"{key}: Rethinking_of_PAR {pkl_path.name} + {image_dir.name}/, {len(attr_names)} evaluated attributes, "
        f"partition {partition} ({', '.join(f'{k} {len(v)}' for k, v in splits.items())})"
    )
    return AttrData(key, pkl_path.parent, layout, [str(image_dir / n) for n in names], labels, attr_names, splits)


def _pickle_image_dir(folder: Path, recorded_root: str) -> Path:
    if recorded_root and Path(recorded_root).is_dir():
        return Path(recorded_root)
    candidates = ([Path(recorded_root).name] if recorded_root else []) + list(_PICKLE_IMAGE_DIRS)
    for name in candidates:
        if name and (folder / name).is_dir():
            return folder / name
    raise ClaspError(f"no image folder under {folder}: expected one of {', '.join(n for n in candidates if n)}")


def _check_first_image(image_dir: Path, name: str, source: Path) -> None:
    if not (image_dir / name).is_file():
        raise ClaspError(f"{image_dir / name} (listed in {source}) does not exist: wrong or incomplete image folder")
