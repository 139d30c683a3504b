"""Stored CLIP embeddings (``clasp label --store-embeddings``): the column, stock DuckDB, the stream, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers.labels import TINY_CLIP, ingest_folder, label_cfg, noise_images, write_clip_dir
from helpers.pretraining import tiny_config

from labeling.clip_model import DenseClip, load_clip
from labeling.image_shards import ShardImages, index_shard
from labeling.label import run_labeling
from pipeline.errors import ClaspError
from pipeline.formats import image_shard_path, label_shard_path, labels_dir
from pretrain.data import build_stream

EMBED_DIM = TINY_CLIP["embed_dim"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip_dir(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory, clip_dir: Path) -> tuple[Path, str, str]:
    """(root, label set with embeddings, label set without) of one 20-image corpus in 2 shards."""
    root = ingest_folder(noise_images(20), tmp_path_factory.mktemp("root"), "toy", per_shard=10)
    with_embed = run_labeling(label_cfg(root, "toy", clip_dir, with_embed=True)).labelset
    without = run_labeling(label_cfg(root, "toy", clip_dir)).labelset
    return root, with_embed, without


def test_stored_embedding_is_the_clip_image_embedding_in_fp16(labelled, clip_dir: Path) -> None:
    root, set_id, plain = labelled
    assert set_id != plain  # storing embeddings is a different label set, never an overwrite
    table = pq.read_table(label_shard_path(root, "toy", set_id, 0))
    stored = np.stack([np.frombuffer(b, "<f2") for b in table.column("clip_embed").to_pylist()]).astype(np.float32)
    assert stored.shape == (10, EMBED_DIM)
    assert np.allclose(np.linalg.norm(stored, axis=1), 1.0, atol=2e-3)
    # recompute the first image's embedding the way the labeler does (same resolution, same tower)
    loaded = load_clip("test-tiny", clip_dir, allow_random_weights=True)
    index = index_shard(image_shard_path(root, "toy", 0))
    _, image, _ = ShardImages([index], (64, 32))[0]
    mean = torch.tensor(loaded.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(loaded.std).view(1, 3, 1, 1) * 255
    with torch.no_grad():
        emb, _ = DenseClip(loaded.model, (64, 32))((image[None].float() - mean) / std)
    assert np.allclose(stored[0], emb[0].numpy(), atol=2e-3)


def test_stock_duckdb_reads_the_embedding_column(labelled) -> None:
    root, set_id, _ = labelled
    folder = labels_dir(root, "toy", set_id)
    script = textwrap.dedent(f"""
        import json, sys, duckdb
        assert not any(m.split(".")[0] in ("pipeline", "labeling", "pretrain") for m in sys.modules)
        rows = duckdb.sql("SELECT count(*), min(octet_length(clip_embed)), max(octet_length(clip_embed)) "
                          "FROM '{folder}/*.parquet'").fetchall()[0]
        print(json.dumps(list(rows)))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd="/")
    assert json.loads(out.stdout) == [20, 2 * EMBED_DIM, 2 * EMBED_DIM]


def test_the_distillation_stream_carries_each_images_own_embedding(labelled) -> None:
    root, set_id, _ = labelled
    cfg = tiny_config(root, f"data.labelset={set_id}", "model.loss.distill=true")
    stored = {}
    for i in range(2):
        table = pq.read_table(label_shard_path(root, "toy", set_id, i), columns=["key", "clip_embed"]).to_pylist()
        stored |= {r["key"]: np.frombuffer(r["clip_embed"], "<f2").astype(np.float32) for r in table}
    stream = build_stream(
        cfg.data, global_hw=tuple(cfg.model.img_size), patch_size=cfg.model.patch_size, seed=0, clip_embed=True
    )
    assert stream.labelset.clip_embed_dim == EMBED_DIM
    assert stream.labelset.clip["arch"] == "test-tiny" and stream.labelset.clip["weights_id"]
    batch = next(stream.batches())
    assert batch["clip_embed"].shape == (4, EMBED_DIM)
    for key, row in zip(batch["key"], batch["clip_embed"].numpy(), strict=True):
        assert np.array_equal(row, stored[key])
    plain = build_stream(cfg.data, global_hw=tuple(cfg.model.img_size), patch_size=cfg.model.patch_size, seed=0)
    assert "clip_embed" not in next(plain.batches())  # off: the column is not even read


def test_distillation_on_a_label_set_without_embeddings_names_the_flag(labelled) -> None:
    root, _, plain = labelled
    cfg = tiny_config(root, f"data.labelset={plain}", "model.loss.distill=true")
    with pytest.raises(ClaspError, match="stores no CLIP embeddings.*--store-embeddings.*distill=false"):
        build_stream(
            cfg.data, global_hw=tuple(cfg.model.img_size), patch_size=cfg.model.patch_size, seed=0, clip_embed=True
        )


def test_label_command_flag_stores_embeddings(tmp_path: Path, clip_dir: Path) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    root = ingest_folder(noise_images(4, seed=3), tmp_path, "cli", per_shard=4)
    args = ["label", "--root", str(root), "--corpus", "cli", "--clip-checkpoint", str(clip_dir)]
    args += ["--allow-random-weights", "--resolution", "64x32", "--workers", "0", "-q", "--store-embeddings"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (folder,) = [p for p in (root / "cli" / "labels").iterdir() if p.is_dir()]
    assert "clip_embed" in pq.read_schema(folder / "cli-000000.parquet").names


@pytest.mark.parametrize("distill", [True, False])
def test_ablation_labels_with_embeddings_only_for_a_distillation_variant(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, distill: bool
) -> None:
    import labeling.label
    from pipeline import ablate

    seen = []
    from labeling.label import LabelRun

    def fake_run(cfg: object) -> LabelRun:
        seen.append(cfg)
        return LabelRun("set", images=0, shards=0, undecodable=0, loop_s=0.0, total_s=0.0, complete=True)

    monkeypatch.setattr(labeling.label, "run_labeling", fake_run)
    variants = [ablate.Variant(name="clasp")]
    if distill:
        variants.append(ablate.Variant(name="clasp_distill", overrides=["model.loss.distill=true"]))
    cfg = ablate.AblationConfig(out=str(tmp_path), clip="ViT-B-16:openai", variants=variants)
    assert ablate._label(cfg, tmp_path, tmp_path / "data", None, lambda msg: None) == "set"
    assert seen[0].with_embed is distill


def test_trainer_distills_and_the_export_names_the_labels_clip(labelled, tmp_path: Path) -> None:
    from pretrain.trainer import export_run, train

    root, set_id, _ = labelled
    out = tmp_path / "run"
    cfg = tiny_config(
        root, f"data.labelset={set_id}", "model.loss.distill=true", "model.loss.part=false", "model.arch=vit_micro",
        "model.loss.dino_out_dim=64", "model.loss.dino_hidden_dim=32", "model.loss.dino_bottleneck_dim=16",
        "optim.epochs=1", "optim.warmup_epochs=0", "max_steps=2", "log_every=1", "tensorboard=false", "quiet=true",
        f"out={out}",
    )  # fmt: skip
    train(cfg)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(0 < r["loss/distill"] <= 2 for r in rows)
    release = export_run(out, tmp_path / "release")
    clip = json.loads((release / "config.json").read_text())["distill"]["clip"]
    labels_model = json.loads((labels_dir(root, "toy", set_id) / "labelset.json").read_text())["model"]
    assert clip["weights_id"] == labels_model["weights_id"] and clip["arch"] == "test-tiny"
    assert clip["resolution"] == [64, 32]
