"""Text-to-person retrieval: SDM loss, the text tower, and `clasp transfer text-search` end to end on the synthetic
CUHK-PEDES set through the real-layout reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import ClaspError
from pipeline.synth.pedes import write_cuhk_pedes
from transfer.text_search.losses import sdm_loss
from transfer.text_search.model import TextTowerConfig, build_text_tower


def test_sdm_treats_every_same_identity_pair_as_a_match() -> None:
    # two captions of person 7 and their two images, all four embeddings equal: InfoNCE would push the
    # cross pairs apart; SDM's target is uniform over the identity, so the loss is ~0
    emb = F.normalize(torch.ones(2, 4), dim=-1)
    pids = torch.tensor([7, 7])
    assert sdm_loss(emb, emb, pids, logit_scale=50.0).item() == pytest.approx(0.0, abs=1e-6)
    # two different people whose embeddings coincide: the same similarities are now a large penalty
    assert sdm_loss(emb, emb, torch.tensor([1, 2]), logit_scale=50.0).item() > 5.0


def test_sdm_against_a_per_row_kl() -> None:
    torch.manual_seed(0)
    img, txt, pids = torch.randn(6, 8), torch.randn(6, 8), torch.tensor([0, 0, 1, 2, 2, 2])
    scale, eps = 10.0, 1e-8
    sim = scale * F.normalize(txt, dim=-1) @ F.normalize(img, dim=-1).t()
    expected = 0.0
    for logits in (sim, sim.t()):
        for i in range(6):
            p = torch.softmax(logits[i], 0)
            q = (pids == pids[i]).float() / (pids == pids[i]).sum()
            expected += float((p * (torch.log(p) - torch.log(q + eps))).sum()) / 6
    assert sdm_loss(img, txt, pids, logit_scale=scale).item() == pytest.approx(expected, rel=1e-5)


def test_text_tower_random_is_trainable_only() -> None:
    tower, tokenizer, identity = build_text_tower(TextTowerConfig(clip="clasp-vit-tiny-8"))
    assert identity["weights_id"] == "random" and tower.embed_dim == 64
    assert tower(tokenizer(["a man in a red shirt"])).shape == (1, 64)
    assert all(p.requires_grad for p in tower.parameters()) and tower.clip.visual is None
    with pytest.raises(ClaspError, match="frozen random text tower cannot learn"):
        build_text_tower(TextTowerConfig(clip="clasp-vit-tiny-8", freeze=True))


def test_text_search_end_to_end_on_synthetic_cuhk_pedes(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    data = write_cuhk_pedes(tmp_path / "world" / "cuhk_pedes", seed=1, train_ids=6, val_ids=0, test_ids=3)
    out = tmp_path / "text"
    args = ["transfer", "text-search", "--data", str(data), "--dataset", "cuhk-pedes", "--out", str(out), "--quiet",
            "--config", "configs/transfer/text_search_synthetic.yaml", "--backbone", "random:vit_tiny_patch16_224",
            "backbone.timm_kwargs={depth: 2, embed_dim: 64, num_heads: 2}", "data.img_size=[64,32]",
            "data.batch_size=8", "epochs=2", "max_steps_per_epoch=3", "device=cpu"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.json").read_text())
    assert record["task"] == "text-search" and record["dataset"] == "cuhk-pedes"
    assert "reid_raw.json" in record["layout"] and "IRRA" in record["protocol"]
    entries = json.loads((data / "reid_raw.json").read_text())
    test = [e for e in entries if e["split"] == "test"]
    assert f"{sum(len(e['captions']) for e in test)} caption queries x {len(test)} images" in record["protocol"]
    scores = record["metrics"]
    assert set(scores) == {"R1", "R5", "R10", "mAP", "mINP"} and all(0 <= v <= 100 for v in scores.values())
    assert scores["R1"] <= scores["R5"] <= scores["R10"]
    assert record["training"]["steps"] == 6 and np.isfinite(record["training"]["final_loss"])
    assert {"sdm", "id"} <= set(record["history"][-1])
    assert record["text_tower"]["arch"] == "clasp-vit-tiny-8" and record["text_tower"]["frozen"] is False
    assert "| R1 |" in (out / "results.md").read_text() and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["synthetic", "cuhk_pedes", "icfg_pedes", "rstpreid"])
def test_shipped_configs_load(name: str) -> None:
    from pipeline.config import load_config
    from transfer.registry import task_entry

    config_cls, _ = task_entry("text-search")
    cfg = load_config(config_cls, Path(__file__).parents[1] / "configs" / "transfer" / f"text_search_{name}.yaml")
    assert cfg.loss.temperature == 0.02 and cfg.data.img_size in ((128, 64), (384, 128))
    if name != "synthetic":
        assert cfg.dataset.replace("-", "_") == name and cfg.text.clip == "ViT-B-16:openai"


def test_text_tower_loads_a_local_clip_folder_with_its_weights(tmp_path: Path) -> None:
    """A folder as `clasp clip-train` writes it (open_clip local-dir layout) gives exactly its text embeddings."""
    import open_clip
    from safetensors.torch import save_file

    import labeling.clip_model  # noqa: F401 - registers the project's clasp-vit-tiny-8 architecture with open_clip

    torch.manual_seed(0)
    clip = open_clip.create_model("clasp-vit-tiny-8")
    with torch.no_grad():
        clip.logit_scale.fill_(3.0)  # a trained temperature (an untouched one marks random weights)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    preprocess = {"size": [128, 64], "mean": [0.5] * 3, "std": [0.5] * 3, "resize_mode": "squash"}
    config = {"arch": "clasp-vit-tiny-8", "model_cfg": open_clip.get_model_config("clasp-vit-tiny-8"),
              "preprocess_cfg": preprocess}  # fmt: skip
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    tower, tokenizer, identity = build_text_tower(TextTowerConfig(clip="clasp-vit-tiny-8", checkpoint=str(tmp_path),
                                                                  freeze=True))  # fmt: skip
    tokens = tokenizer(["a woman with a red backpack"])
    assert torch.allclose(tower(tokens), clip.eval().encode_text(tokens), atol=1e-5)
    assert identity["weights_id"] != "random" and identity["frozen"] is True
    assert not any(p.requires_grad for p in tower.parameters()) and not tower.train().training


def test_an_evaluation_split_the_file_lacks_is_named(tmp_path: Path) -> None:
    from pipeline.config import load_config
    from transfer.text_search.train import TextSearchConfig, run

    data = write_cuhk_pedes(tmp_path / "CUHK-PEDES", seed=2, train_ids=2, val_ids=0, test_ids=2, images_per_id=(1, 1))
    cfg = load_config(TextSearchConfig, overrides=[f"data_dir={data}", f"out_dir={tmp_path / 'out'}", "eval.split=val"])
    with pytest.raises(ClaspError, match="has no 'val' split; set eval.split to one of \\['test'\\]"):
        run(cfg)


def test_two_processes_evaluate_as_one(tmp_path: Path) -> None:
    """accelerate launch on 2 CPU processes: the gathered gallery/queries give one process's numbers (lr ~0)."""
    import os
    import subprocess
    import sys

    from helpers.launching import accelerate_launch

    repo = Path(__file__).resolve().parents[1]
    data = write_cuhk_pedes(tmp_path / "CUHK-PEDES", seed=5, train_ids=4, val_ids=0, test_ids=5)
    common = ["transfer", "text-search", "--data", str(data), "--dataset", "cuhk-pedes", "--quiet", "--backbone",
              "random:vit_micro", "--config", str(repo / "configs/transfer/text_search_synthetic.yaml"), "epochs=1",
              "max_steps_per_epoch=1", "optim.lr=1e-30", "data.global_batch=8", "device=cpu"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    runs = {}
    for processes in (1, 2):
        args = [*common, "--out", str(tmp_path / f"p{processes}")]
        cmd = (
            [sys.executable, "-m", "pipeline.cli", *args]
            if processes == 1
            else accelerate_launch("-m", "pipeline.cli", *args)
        )
        done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[processes] = json.loads((tmp_path / f"p{processes}" / "results.json").read_text())["metrics"]
    for key, value in runs[1].items():
        assert runs[2][key] == pytest.approx(value, abs=1e-4), key
