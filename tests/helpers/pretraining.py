"""A tiny pre-training world built by hand: image shards whose pixels encode the image's key, label shards
whose values encode the same key (so misalignment shows), the settings and the model that train on it in
seconds, and a spy script that records which keys each launched process read.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline import formats
from pipeline.config import load_config
from pretrain.config import PretrainConfig
from pretrain.data import build_stream

REPO = Path(__file__).resolve().parents[2]
# the stream at 32x16 with 8px patches, a few images a batch, in the test process (no loader workers)
TINY_DATA = [
    "data.batch_size=4",
    "data.workers=0",
    "data.num_local_crops=2",
    "data.photometric=false",
    "data.shuffle_buffer=4",
    "model.img_size=[32,16]",
    "model.patch_size=8",
]

PARTS = ["background", "head", "left_arm", "right_arm", "legs"]
ATTRS = ["a0", "a1", "a2"]
GRID = (8, 4)
LABELSET = "testset0001"


def image_colour(shard: int, i: int) -> tuple[int, int, int]:
    """Solid colour that identifies an image (survives JPEG within a few levels)."""
    return (40 + 50 * shard, 20 + 25 * i, 200)


def write_corpus(
    root: Path,
    *,
    corpus: str = "toy",
    shards: int = 4,
    per_shard: int = 8,
    image_hw: tuple[int, int] = (64, 32),
    scramble_shard: int | None = None,
) -> Path:
    """Image shards (<key>.jpg + <key>.json, sizes.json) and a label set whose rows encode their key.

    ``attr_prob`` = (shard, index, 7); part map cell ``c`` (row-major) holds class ``c % len(PARTS)``.
    ``scramble_shard`` writes that label shard's rows in a different order (a broken label set).
    """
    img_dir = formats.images_dir(root, corpus)
    lab_dir = formats.labels_dir(root, corpus, LABELSET)
    img_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    schema = formats.label_schema(len(ATTRS), PARTS)
    cells = GRID[0] * GRID[1]
    sizes = {}
    for s in range(shards):
        tar_path = formats.image_shard_path(root, corpus, s)
        keys = [f"img_{s:02d}_{i:03d}" for i in range(per_shard)]
        with tarfile.open(tar_path, "w") as tar:
            for i, key in enumerate(keys):
                buf = io.BytesIO()
                Image.new("RGB", (image_hw[1], image_hw[0]), image_colour(s, i)).save(buf, "JPEG", quality=95)
                meta = json.dumps({"width": image_hw[1], "height": image_hw[0], "source": key}).encode()
                for name, data in ((f"{key}.jpg", buf.getvalue()), (f"{key}.json", meta)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        sizes[tar_path.name] = per_shard
        rows = list(range(per_shard))
        if s == scramble_shard:
            rows = rows[1:] + rows[:1]
        columns = {
            "key": [keys[i] for i in rows],
            "attr_prob": [[s, i, 7] for i in rows],
            "part_map": [bytes(c % len(PARTS) for c in range(cells)) for _ in rows],
            "part_conf": [bytes([255] * cells) for _ in rows],
            "fg_ratio": [0.5 for _ in rows],
        }
        for name in PARTS[1:]:
            columns[f"area_{name}"] = [0 for _ in rows]
            columns[f"row_{name}"] = [None for _ in rows]
        pq.write_table(pa.table(columns, schema=schema), formats.label_shard_path(root, corpus, LABELSET, s))
    (img_dir / formats.SIZES_FILE).write_text(json.dumps(sizes))
    labelset = {"labelset": LABELSET, "grid": list(GRID), "attributes": {"names": ATTRS}, "parts": {"names": PARTS}}
    (lab_dir / formats.LABELSET_FILE).write_text(json.dumps(labelset))
    return root


def tiny_config(root: Path, *overrides: str) -> PretrainConfig:
    """Pre-training settings for the ``write_corpus`` corpus under ``root`` (add TINY_MODEL to train)."""
    return load_config(PretrainConfig, overrides=[f"data.root={root}", "data.corpus=toy", *TINY_DATA, *overrides])


def stream_for(cfg: PretrainConfig, rank: int = 0, world_size: int = 1):  # noqa: ANN201 - a PretrainStream
    return build_stream(
        cfg.data,
        global_hw=tuple(cfg.model.img_size),
        patch_size=cfg.model.patch_size,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
    )


# vit_micro with a small DINO head, two epochs, a log line every step
TINY_MODEL = [
    "model.arch=vit_micro",
    "model.loss.dino_out_dim=128",
    "model.loss.dino_hidden_dim=64",
    "model.loss.dino_bottleneck_dim=32",
    "optim.epochs=2",
    "optim.warmup_epochs=0.5",
    "log_every=1",
    "tensorboard=false",
    "quiet=true",
]


def losses(run: Path) -> dict[int, float]:
    """Total loss by step from a run's log.jsonl."""
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/total"] for r in rows}


# run by `accelerate launch` as a script: argv = corpus root, overrides; writes keys-<rank>.json into cfg.out
SPY = """
    import json, sys
    sys.path.insert(0, {tests!r})
    from accelerate import PartialState
    from helpers.pretraining import tiny_config
    import pretrain.trainer as trainer

    seen = []
    original = trainer.to_model_batch

    def spy(batch, *args, **kwargs):
        seen.append(list(batch["key"]))
        return original(batch, *args, **kwargs)

    trainer.to_model_batch = spy
    cfg = tiny_config(sys.argv[1], *sys.argv[2:])
    summary = trainer.train(cfg)
    rank = PartialState().process_index
    with open(f"{{cfg.out}}/keys-{{rank}}.json", "w") as fh:
        json.dump({{"keys": seen, "step": summary.step, "loss": summary.last_terms["total"]}}, fh)
"""
