"""Text-search readers (CUHK-PEDES, ICFG-PEDES, RSTPReid layouts) and the synthetic CUHK-PEDES writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pipeline.errors import ClaspError
from pipeline.synth.pedes import write_cuhk_pedes
from transfer.text_search.datasets import load_text_search_dataset


@pytest.fixture(scope="module")
def pedes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cuhk_pedes(tmp_path_factory.mktemp("pedes") / "CUHK-PEDES", seed=3, train_ids=4, val_ids=2, test_ids=3)


def test_synthetic_cuhk_pedes_reads_through_the_real_layout_reader(pedes: Path) -> None:
    entries = json.loads((pedes / "reid_raw.json").read_text())
    assert {"split", "id", "file_path", "captions", "processed_tokens"} <= set(entries[0])
    assert sorted({e["id"] for e in entries}) == list(range(1, 10))  # 1-based over train, val, test
    data = load_text_search_dataset("cuhk-pedes", pedes.parent)  # the parent folder works too
    summary = data.summary()
    assert summary["train_ids"] == 4 and summary["val_ids"] == 2 and summary["test_ids"] == 3
    assert summary["train_captions"] == 2 * summary["train_images"]  # two captions per image, as CUHK-PEDES
    assert sorted({pid for _, pid, _ in data.train}) == [0, 1, 2, 3]  # training ids relabelled
    assert {pid for _, pid in data.splits["test"].captions} == {7, 8, 9}  # evaluation keeps the file's ids


def test_captions_vary_in_wording_within_an_identity(pedes: Path) -> None:
    entries = json.loads((pedes / "reid_raw.json").read_text())
    for pid in {e["id"] for e in entries}:
        mine = [c for e in entries if e["id"] == pid for c in e["captions"]]
        assert len(mine) >= 4  # 2-4 images x 2 captions
        openings = {c.split(" ")[0].lower() for c in mine}
        assert len(set(mine)) >= 3 and len(openings) >= 2, mine  # not one sentence repeated


def test_writer_is_deterministic_and_reuses_a_finished_folder(pedes: Path, tmp_path: Path) -> None:
    again = write_cuhk_pedes(tmp_path / "CUHK-PEDES", seed=3, train_ids=4, val_ids=2, test_ids=3)
    assert (again / "reid_raw.json").read_bytes() == (pedes / "reid_raw.json").read_bytes()
    first = sorted(p.name for p in (pedes / "imgs" / "CUHK01").iterdir())
    assert first == sorted(p.name for p in (again / "imgs" / "CUHK01").iterdir())
    stamp = (again / "reid_raw.json").stat().st_mtime_ns
    write_cuhk_pedes(tmp_path / "CUHK-PEDES", seed=3, train_ids=4, val_ids=2, test_ids=3)
    assert (again / "reid_raw.json").stat().st_mtime_ns == stamp
    with pytest.raises(ClaspError, match="already holds other data"):
        write_cuhk_pedes(tmp_path / "CUHK-PEDES", seed=4, train_ids=4, val_ids=2, test_ids=3)


def _layout(root: Path, annotation: str, path_key: str, entries: list[dict]) -> Path:
    (root / "imgs" / "a").mkdir(parents=True)
    for e in entries:
        Image.new("RGB", (8, 16)).save(root / "imgs" / e[path_key])
    (root / annotation).write_text(json.dumps(entries))
    return root


def _entries(path_key: str, splits: tuple[str, ...] = ("train", "train", "test", "test")) -> list[dict]:
    return [
        {"split": s, "id": i // 2, path_key: f"a/{i}.jpg", "captions": [f"person {i // 2} view {i}", "another"]}
        for i, s in enumerate(splits)
    ]


@pytest.mark.parametrize(
    ("name", "folder", "annotation", "path_key"),
    [("icfg-pedes", "ICFG-PEDES", "ICFG-PEDES.json", "file_path"), ("rstpreid", "RSTPReid", "data_captions.json",
                                                                   "img_path")],
)  # fmt: skip
def test_icfg_and_rstpreid_layouts(tmp_path: Path, name: str, folder: str, annotation: str, path_key: str) -> None:
    _layout(tmp_path / folder, annotation, path_key, _entries(path_key))
    data = load_text_search_dataset(name, tmp_path)
    assert data.summary() == {"train_images": 2, "train_captions": 4, "train_ids": 1, "test_images": 2,
                              "test_captions": 4, "test_ids": 1}  # fmt: skip
    assert data.train[0][0].endswith(f"{folder}/imgs/a/0.jpg")


def _bad(tmp_path: Path, entries: object) -> Path:
    root = _layout(tmp_path / "CUHK-PEDES", "reid_raw.json", "file_path", _entries("file_path"))
    (root / "reid_raw.json").write_text(entries if isinstance(entries, str) else json.dumps(entries))
    return root


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[{", "reid_raw.json is not valid JSON"),
        ({"split": "train"}, "must hold a non-empty JSON list"),
        ([{"split": "train", "id": 1, "captions": ["x"]}], "entry 0 has no 'file_path'"),
        ([{"split": "dev", "id": 1, "file_path": "a/0.jpg", "captions": ["x"]}], "entry 0: split 'dev' is not one"),
        ([{"split": "train", "id": "p1", "file_path": "a/0.jpg", "captions": ["x"]}], "id 'p1' is not an integer"),
        ([{"split": "train", "id": 1, "file_path": "a/0.jpg", "captions": []}], "'captions' must be a non-empty list"),
        (
            [{"split": "train", "id": 1, "file_path": "a/9.jpg", "captions": ["x"]}],
            r"1 image\(s\) listed .* missing",
        ),
        ([{"split": "train", "id": 1, "file_path": "a/0.jpg", "captions": ["x"]}], "no entries with split 'test'"),
    ],
)
def test_bad_annotation_is_one_clear_error(tmp_path: Path, content: object, message: str) -> None:
    root = _bad(tmp_path, content)
    with pytest.raises(ClaspError, match=message) as info:
        load_text_search_dataset("cuhk-pedes", root)
    assert "reid_raw.json" in str(info.value) or "imgs" in str(info.value)


def test_missing_files_and_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(ClaspError, match="no reid_raw.json under"):
        load_text_search_dataset("cuhk-pedes", tmp_path)
    (tmp_path / "reid_raw.json").write_text("[]")
    with pytest.raises(ClaspError, match="image folder .*imgs/ is missing"):
        load_text_search_dataset("cuhk-pedes", tmp_path)
    with pytest.raises(ClaspError, match="unknown text-search dataset 'flickr30k'"):
        load_text_search_dataset("flickr30k", tmp_path)


def test_the_world_writes_cuhk_pedes_when_asked(tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.synth.world import SynthConfig, write_world

    overrides = ["identities=2", "quiet=true", "dense=[cuhk_pedes]", "dense_scale=0.05", "pa100k_images=10"]
    summary = write_world(load_config(SynthConfig, overrides=overrides), tmp_path / "w")
    assert summary["dense"] == ["cuhk_pedes"]
    data = load_text_search_dataset("cuhk-pedes", tmp_path / "w" / "cuhk_pedes")
    assert data.summary()["train_ids"] == 3 and data.summary()["test_ids"] == 2  # 64 x 0.05, floor 2
