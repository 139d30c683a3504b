"""Stage 0 (``clasp ingest``): the shard contract of DESIGN.md section 2.1, read back with stock tools."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.errors import ClaspError
from pipeline.formats import MANIFEST_COLUMNS, images_dir, read_sizes
from pipeline.ingest import IngestConfig, ingest
from pipeline.sources import make_key, probe_image

N_BAD = 4
BAD_REASONS = (
    "truncated JPEG (no end-of-image",
    "truncated JPEG (ends inside the header",
    "empty file",
    "not an image",
)


def _jpeg(rng: random.Random, **save: object) -> bytes:
    w, h = rng.randint(16, 40), rng.randint(48, 96)
    small = Image.frombytes("RGB", (w // 4, h // 4), rng.randbytes(3 * (w // 4) * (h // 4)))
    buf = io.BytesIO()
    small.resize((w, h)).save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(synth_world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A copy of the synthetic world's LUPerson folder and LMDB with planted corrupt and extra files."""
    import lmdb

    base = tmp_path_factory.mktemp("ingest_corpus")
    folder = shutil.copytree(synth_world / "luperson", base / "luperson")
    lmdb_dir = shutil.copytree(synth_world / "luperson_lmdb", base / "luperson_lmdb")
    good = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.jpg"))}
    videos = sorted({rel.rsplit("/", 1)[0] for rel in good})
    first = next(iter(good.values()))
    png = io.BytesIO()
    Image.new("RGB", (20, 50), (200, 10, 10)).save(png, format="PNG")
    extra = {
        f"{videos[0]}/900100.jpg": _jpeg(random.Random(3), progressive=True),
        f"{videos[1]}/900200.png": png.getvalue(),
        f"{videos[2]}/900300.jpg": first,  # exact duplicate bytes of another frame
    }
    bad_bytes = (first[:-300], first[:120], b"", b"this is a text file, not a JPEG\n")
    bad = {f"{videos[i % len(videos)]}/99000{i}.jpg": data for i, data in enumerate(bad_bytes)}
    env = lmdb.open(str(lmdb_dir), map_size=1 << 28)
    with env.begin(write=True) as txn:
        for rel, data in {**extra, **bad}.items():
            (folder / rel).write_bytes(data)
            txn.put(make_key(rel).encode(), data)  # the synthetic LMDB keys are the folder keys
    env.close()
    (folder / "README.txt").write_text("not an image: ignored, not rejected\n")
    return {
        "folder": folder,
        "lmdb": lmdb_dir,
        "good": {**good, **extra},
        "bad": dict(zip(bad, BAD_REASONS, strict=True)),
        "duplicate": (make_key(f"{videos[2]}/900300.jpg"), make_key(next(iter(good)))),
    }


def _cfg(source: Path, root: Path, **kw: object) -> IngestConfig:
    args = {"format": "folder", "corpus": "lup", "images_per_shard": 10, "seed": 0, "workers": 1, "quiet": True}
    return IngestConfig(source=str(source), root=str(root), **{**args, **kw})


def _read_with_stock_webdataset(out: Path) -> list[dict]:
    import webdataset as wds

    urls = [str(out / name) for name in read_sizes(out.parent.parent, out.parent.name)]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def _files(out: Path) -> dict[str, bytes]:
    names = [p for p in out.iterdir() if p.suffix == ".tar" or p.name in ("manifest.parquet", "sizes.json")]
    return {p.name: p.read_bytes() for p in sorted(names)}


@pytest.fixture(scope="module")
def folder_run(corpus: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    root = tmp_path_factory.mktemp("root_folder")
    summary = ingest(_cfg(corpus["folder"], root))
    return root, images_dir(root, "lup"), summary


def test_every_readable_image_once_with_original_bytes(corpus: dict, folder_run: tuple) -> None:
    _, out, summary = folder_run
    good = corpus["good"]
    samples = _read_with_stock_webdataset(out)
    keys = [s["__key__"] for s in samples]
    assert sorted(keys) == sorted(make_key(rel) for rel in good) and len(set(keys)) == len(keys)
    assert (summary.images, summary.rejects, summary.duplicates) == (len(good), len(corpus["bad"]), 1)
    assert summary.shards == -(-(len(good) + len(corpus["bad"])) // 10)
    for sample in samples:
        meta = json.loads(sample["json"])
        data = sample.get("jpg", sample.get("png"))
        assert data == good[meta["source"]], f"{sample['__key__']}: bytes were changed"
        assert ("png" in sample) == meta["source"].endswith(".png")
        with Image.open(io.BytesIO(data)) as im:
            assert (meta["width"], meta["height"]) == im.size
        assert sample["__key__"] == make_key(meta["source"])


def test_manifest_and_sizes_agree_with_tars(folder_run: tuple) -> None:
    root, out, summary = folder_run
    manifest = pq.read_table(out / "manifest.parquet")
    assert tuple(manifest.column_names) == MANIFEST_COLUMNS
    meta = json.loads(manifest.schema.metadata[b"clasp.ingest"])
    assert (meta["seed"], meta["images_per_shard"], meta["format"]) == (0, 10, "folder")
    rows = manifest.to_pylist()
    samples = _read_with_stock_webdataset(out)
    assert len(rows) == len(samples) == summary.images
    sizes = read_sizes(root, "lup")
    assert sum(sizes.values()) == len(rows) and len(sizes) == summary.shards
    for row, sample in zip(rows, samples, strict=True):
        data = sample.get("jpg", sample.get("png"))
        assert row["key"] == sample["__key__"]
        assert sample["__url__"].endswith(f"lup-{row['shard']:06d}.tar")
        assert (row["n_bytes"], row["content_hash"]) == (len(data), hashlib.sha256(data).hexdigest())
    for name, count in sizes.items():
        shard = [r for r in rows if f"lup-{r['shard']:06d}.tar" == name]
        assert [r["index"] for r in shard] == list(range(count))


def test_rejects_and_duplicates_are_listed(corpus: dict, folder_run: tuple) -> None:
    _, out, _ = folder_run
    with open(out / "rejects.csv", newline="") as fh:
        rejects = {r["source"]: r["reason"] for r in csv.DictReader(fh)}
    assert set(rejects) == set(corpus["bad"])
    for source, reason in corpus["bad"].items():
        assert reason in rejects[source], (source, rejects[source])
    with open(out / "duplicates.csv", newline="") as fh:
        (dup,) = list(csv.DictReader(fh))
    assert {dup["key"], dup["duplicate_of"]} == set(corpus["duplicate"])
    assert "README" not in (out / "rejects.csv").read_text()


def test_shuffle_mixes_videos_across_shards(folder_run: tuple) -> None:
    rows = pq.read_table(folder_run[1] / "manifest.parquet").to_pylist()
    shards_of_video: dict[str, set[int]] = {}
    videos_in_shard: dict[int, set[str]] = {}
    for row in rows:
        video = row["key"].rsplit("_", 1)[0]
        shards_of_video.setdefault(video, set()).add(row["shard"])
        videos_in_shard.setdefault(row["shard"], set()).add(video)
    assert all(len(s) >= 3 for s in shards_of_video.values()), shards_of_video
    sizes = {shard: sum(r["shard"] == shard for r in rows) for shard in videos_in_shard}
    assert all(len(videos_in_shard[shard]) >= 2 for shard, n in sizes.items() if n >= 4), videos_in_shard


def test_rerun_is_a_noop_and_same_seed_is_byte_identical(corpus: dict, folder_run: tuple, tmp_path: Path) -> None:
    root, out, _ = folder_run
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()}
    again = ingest(_cfg(corpus["folder"], root))
    assert again.shards_skipped == again.shards
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()}
    assert after == before
    fresh = ingest(_cfg(corpus["folder"], tmp_path))
    assert _files(images_dir(tmp_path, "lup")) == _files(out)
    assert fresh.images == again.images


def test_other_seed_reorders_and_is_refused_without_overwrite(corpus: dict, tmp_path: Path) -> None:
    ingest(_cfg(corpus["folder"], tmp_path))
    first = pq.read_table(images_dir(tmp_path, "lup") / "manifest.parquet", columns=["key"]).column(0).to_pylist()
    with pytest.raises(ClaspError, match=r"seed: 0 -> 5.*--overwrite"):
        ingest(_cfg(corpus["folder"], tmp_path, seed=5))
    ingest(_cfg(corpus["folder"], tmp_path, seed=5, overwrite=True))
    second = pq.read_table(images_dir(tmp_path, "lup") / "manifest.parquet")
    assert sorted(second.column("key").to_pylist()) == sorted(first) and second.column("key").to_pylist() != first
    assert json.loads(second.schema.metadata[b"clasp.ingest"])["seed"] == 5


def test_resume_after_a_crash(corpus: dict, folder_run: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.ingest_shards as shards_mod

    reference = _files(folder_run[1])
    real_write = shards_mod.write_shard
    calls = []

    def crash_on_third(task, progress=None):  # noqa: ANN001, ANN202
        calls.append(task.index)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process dies mid-run
        return real_write(task, progress)

    monkeypatch.setattr(shards_mod, "write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        ingest(_cfg(corpus["folder"], tmp_path))
    monkeypatch.setattr(shards_mod, "write_shard", real_write)
    out = images_dir(tmp_path, "lup")
    assert not (out / "manifest.parquet").exists() and not (out / "sizes.json").exists()
    (out / "lup-000002.tar.tmp-999999").write_bytes(b"half a shard")  # what a killed writer leaves
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert len(done) == 2
    summary = ingest(_cfg(corpus["folder"], tmp_path))
    assert summary.shards_skipped == 2
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name in done} == done
    assert not list(out.glob("*.tmp-*"))
    assert _files(out) == reference
    # A shard deleted after completion is rebuilt, byte-identical, and the manifest rewritten.
    (out / "lup-000001.tar").unlink()
    ingest(_cfg(corpus["folder"], tmp_path))
    assert _files(out) == reference


def test_lmdb_and_list_sources_give_the_folder_keys(corpus: dict, folder_run: tuple, tmp_path: Path) -> None:
    folder_rows = pq.read_table(folder_run[1] / "manifest.parquet").to_pylist()
    lmdb_sum = ingest(_cfg(corpus["lmdb"], tmp_path / "l", format="lmdb"))
    lmdb_rows = pq.read_table(images_dir(tmp_path / "l", "lup") / "manifest.parquet").to_pylist()
    by_key = {r["key"]: r["content_hash"] for r in folder_rows}
    assert {r["key"]: r["content_hash"] for r in lmdb_rows} == by_key
    assert lmdb_sum.rejects == len(corpus["bad"])
    # A list file: relative entries (to the list's folder) and absolute ones.
    rels = sorted(corpus["good"])
    lines = [rel if i % 2 else str(corpus["folder"] / rel) for i, rel in enumerate(rels)]
    list_file = corpus["folder"] / "images.txt"
    list_file.write_text("# LUPerson subset\n" + "\n".join(lines) + "\n")
    try:
        ingest(_cfg(list_file, tmp_path / "t", format="list"))
    finally:
        list_file.unlink()
    list_rows = pq.read_table(images_dir(tmp_path / "t", "lup") / "manifest.parquet").to_pylist()
    assert {r["key"]: r["content_hash"] for r in list_rows} == by_key


def test_parallel_workers_write_the_same_bytes(corpus: dict, folder_run: tuple, tmp_path: Path) -> None:
    ingest(_cfg(corpus["folder"], tmp_path, workers=2))
    assert _files(images_dir(tmp_path, "lup")) == _files(folder_run[1])


def test_key_collisions_and_bad_settings_are_clear_errors(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    data = _jpeg(random.Random(0))
    (src / "a" / "b.jpg").write_bytes(data)
    (src / "a_b.jpg").write_bytes(data)
    with pytest.raises(ClaspError, match=r"'a/b.jpg' and 'a_b.jpg' -> key 'a_b'"):
        ingest(_cfg(src, tmp_path / "root"))
    with pytest.raises(ClaspError, match="--format 'zip'"):
        ingest(_cfg(src, tmp_path / "root", format="zip"))
    with pytest.raises(ClaspError, match="--corpus 'lup.v2'"):
        ingest(_cfg(src, tmp_path / "root", corpus="lup.v2"))
    with pytest.raises(ClaspError, match="no images found"):
        ingest(_cfg(tmp_path / "root", tmp_path / "root2"))
    from pipeline.ingest import _lock

    (src / "a_b.jpg").unlink()
    held = _lock(images_dir(tmp_path / "root3", "lup"))  # as a concurrent run would hold it
    try:
        with pytest.raises(ClaspError, match="another `clasp ingest` is writing"):
            ingest(_cfg(src, tmp_path / "root3"))
    finally:
        held.close()
    assert ingest(_cfg(src, tmp_path / "root3")).images == 1


def test_keys_are_webdataset_safe() -> None:
    assert make_key("ES/madrid/v01/00000003.jpg") == "ES_madrid_v01_00000003"
    assert make_key("a b/frame.0001.JPEG") == "a_b_frame_0001"
    assert make_key("00_01_0002_00000003") == "00_01_0002_00000003"  # LUPerson LMDB key
    assert make_key("./x/ñ.png") == "x__"


def test_probe_reads_size_from_headers_and_catches_truncation() -> None:
    rng = random.Random(1)
    for kw in ({}, {"progressive": True}, {"exif": b"Exif\x00\x00" + bytes(64)}):
        data = _jpeg(rng, **kw)
        with Image.open(io.BytesIO(data)) as im:
            assert (probe_image(data).width, probe_image(data).height) == im.size
        assert probe_image(data).ext == "jpg"
        for cut in (len(data) - 2, len(data) // 2, 40, 3):
            assert probe_image(data[:cut]).reason.startswith("truncated JPEG"), cut
    assert probe_image(data + b"\x00" * 16).ext == "jpg"  # padding after end-of-image is tolerated
    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, format="GIF")
    assert "unsupported image format GIF" in probe_image(gif.getvalue()).reason


def test_cli_ingest(corpus: dict, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    args = ["ingest", "--source", str(corpus["lmdb"]), "--format", "lmdb", "--corpus", "cli", "--root", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, "--images-per-shard", "16", "-j", "1", "seed=3"])
    assert result.exit_code == 0, result.output
    assert "4 rejected" in result.output
    out = images_dir(tmp_path, "cli")
    assert json.loads((out / "ingest.json").read_text())["config"]["seed"] == 3
    assert sum(read_sizes(tmp_path, "cli").values()) == len(corpus["good"])
    result = CliRunner().invoke(app, [*args, "--seed", "4"])
    assert isinstance(result.exception, ClaspError)


def test_source_untouched(corpus: dict) -> None:
    # Ingest never writes into its source (the list test removes its own list file).
    names = {p.relative_to(corpus["folder"]).as_posix() for p in corpus["folder"].rglob("*") if p.is_file()}
    assert names == set(corpus["good"]) | set(corpus["bad"]) | {"README.txt"}


def test_shared_ingested_corpus_matches_the_synthetic_ground_truth(synth_world: Path, ingested: tuple) -> None:
    # The session fixture other stages build on: its keys, sources and sizes are the generator's own.
    root, corpus = ingested
    manifest = pq.read_table(
        images_dir(root, corpus) / "manifest.parquet", columns=["key", "source", "width", "height"]
    )
    gt = pq.read_table(synth_world / "gt.parquet", columns=["key", "source", "width", "height"])
    assert sorted(manifest.to_pylist(), key=lambda r: r["key"]) == sorted(gt.to_pylist(), key=lambda r: r["key"])
