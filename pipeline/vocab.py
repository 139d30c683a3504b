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
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: part vocabulary is missing field {exc}") from None
    if vocab.names[0] != "background":
        raise ValueError(f"{path}: the first part class must be 'background' (class id 0)")
    return vocab
