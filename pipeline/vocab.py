"""Prompt vocabularies (data_manifests/*.yaml): attribute and body-part names with their prompts."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.resources import shipped_path

MANIFESTS_DIR = Path(os.environ.get("CLASP_MANIFESTS", shipped_path("data_manifests")))
DEFAULT_ATTRIBUTES = MANIFESTS_DIR / "attributes_pa100k.yaml"
DEFAULT_PARTS = MANIFESTS_DIR / "parts.yaml"


@dataclass(frozen=True)
class Attribute:
    name: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    group: str | None = None


@dataclass(frozen=True)
class AttributeVocab:
    name: str
    templates: tuple[str, ...]
    attributes: tuple[Attribute, ...]

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.attributes]


@dataclass(frozen=True)
class PartVocab:
    name: str
    templates: tuple[str, ...]
    names: tuple[str, ...]  # index = class id, 0 = background
    prompts: tuple[tuple[str, ...], ...]
    person_prompts: tuple[str, ...] = field(default=())
    background_prompts: tuple[str, ...] = field(default=())
    # left/right classes a horizontal flip swaps ({left_arm: right_arm, right_arm: left_arm}); written to
    # labelset.json's parts.flip, from where pre-training renames classes of flipped crops
    flip: dict[str, str] = field(default_factory=dict)


def _read_yaml(path: Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} vocabulary {path} does not exist")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a {what} vocabulary must be a YAML mapping")
    return data


def load_attributes(path: str | Path = DEFAULT_ATTRIBUTES) -> AttributeVocab:
    data = _read_yaml(Path(path), "attribute")
    try:
        attrs = tuple(
            Attribute(
                name=a["name"], positive=tuple(a["positive"]), negative=tuple(a["negative"]), group=a.get("group")
            )
            for a in data["attributes"]
        )
        vocab = AttributeVocab(name=data["name"], templates=tuple(data.get("templates", ["{}"])), attributes=attrs)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: attribute vocabulary is missing field {exc}") from None
    if len(set(vocab.names)) != len(vocab.names):
        raise ValueError(f"{path}: attribute names must be unique")
    return vocab


def load_parts(path: str | Path = DEFAULT_PARTS) -> PartVocab:
    data = _read_yaml(Path(path), "part")
    try:
        parts = data["parts"]
        fg = data.get("foreground", {})
        vocab = PartVocab(
            name=data["name"],
            templates=tuple(data.get("templates", ["{}"])),
            names=tuple(p["name"] for p in parts),
            prompts=tuple(tuple(p["prompts"]) for p in parts),
            person_prompts=tuple(fg.get("person", ())),
            background_prompts=tuple(fg.get("background", ())),
            flip=_flip_pairs(path, parts),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: part vocabulary is missing field {exc}") from None
    if vocab.names[0] != "background":
        raise ValueError(f"{path}: the first part class must be 'background' (class id 0)")
    return vocab


def _flip_pairs(path: Path, parts: list[dict]) -> dict[str, str]:
    """``flip: <other class>`` of each part entry, made symmetric; both names must be classes."""
    names = [p["name"] for p in parts]
    pairs: dict[str, str] = {}
    for part in parts:
        other = part.get("flip")
        if other is None:
            continue
        if other not in names or other == part["name"]:
            raise ValueError(f"{path}: part '{part['name']}' has flip '{other}', which is not another part class")
        for a, b in ((part["name"], other), (other, part["name"])):
            if pairs.setdefault(a, b) != b:
                raise ValueError(f"{path}: part '{a}' flips to both '{pairs[a]}' and '{b}'")
    return pairs
