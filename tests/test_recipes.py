"""Reproducible paper rows: what the Makefile verbs run, the paper-row configs (citations, task builds, global
batch on 1 and 8 processes), and the recipe pieces they rely on (layer-wise lr decay, UDP, weight EMA,
multi-scale parsing test, the pose detections file)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import load_config
from pipeline.errors import ClaspError
from transfer.backbone import BackboneConfig, build_backbone, layer_lr_scales
from transfer.data import per_process_batch
from transfer.loop import LoopConfig, Training, fine_tune
from transfer.optim import OptimConfig, build_optimizer
from transfer.registry import task_entry

REPO = Path(__file__).resolve().parents[1]
PAPER_ROWS = {
    "reid_market1501": "reid",
    "reid_msmt17": "reid",
    "attributes_pa100k": "attributes",
    "attributes_peta_zs": "attributes",
    "attributes_rap_zs": "attributes",
    "pose_coco": "pose",
    "detection_citypersons": "detection",
    "person_search_cuhk_sysu": "person-search",
    "person_search_prw": "person-search",
    "parsing_lip": "parsing",
}
# The references' global batches (see each config's header).
GLOBAL_BATCH = {
    "reid_market1501": 64,
    "reid_msmt17": 64,
    "attributes_pa100k": 64,
    "attributes_peta_zs": 64,
    "attributes_rap_zs": 64,
    "pose_coco": 512,
    "detection_citypersons": 16,
    "parsing_lip": 64,
}
TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2}


# --- Makefile ---------------------------------------------------------------------------------------


def make_n(*args: str, root: Path, venv: Path) -> list[str]:
    """The commands ``make -n ARGS`` prints (install never remade: its stamp is declared old with -o)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # run as from a shell, also under `make test` (a sub-make would print "Entering directory" lines)
    drop = {"CORPUS", "ROOT", "CONFIG", "GPUS", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    stamp = f"{venv}/.install.stamp"
    root_arg = [] if any(a.startswith("ROOT=") for a in args) else [f"ROOT={root}"]
    proc = subprocess.run(
        ["make", "--no-print-directory", "-n", "-o", stamp, f"VENV={venv}", *args, *root_arg],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.splitlines() if line.strip()]


def only(lines: list[str], word: str) -> str:
    hits = [line for line in lines if f"pipeline.cli {word}" in line or f"clasp {word}" in line]
    assert len(hits) == 1, lines
    return hits[0]


def test_make_pretrain_after_label_luperson_trains_vit_b_on_luperson(tmp_path: Path) -> None:
    label = make_n("label", "CORPUS=luperson", "GPUS=8", root=tmp_path, venv=tmp_path / "venv")
    assert f"echo luperson > {tmp_path}/.clasp-corpus" in label  # the label verb remembers its corpus
    (tmp_path / ".clasp-corpus").write_text("luperson\n")  # what that line writes when it runs
    line = only(make_n("pretrain", "GPUS=8", root=tmp_path, venv=tmp_path / "venv"), "pretrain")
    assert "--num_processes $(( 8 * 1 ))" in line and "--multi_gpu" in line
    assert "--config configs/pretrain/vit_b_luperson.yaml" in line
    assert "data.corpus=luperson" in line and "demo.yaml" not in line


def test_make_pretrain_never_overrides_the_yaml_corpus_with_a_default(tmp_path: Path) -> None:
    line = only(make_n("pretrain", root=tmp_path, venv=tmp_path / "venv"), "pretrain")
    assert "--config configs/pretrain/vit_b_luperson.yaml" in line
    assert "data.corpus" not in line  # nothing named, nothing remembered: the YAML's own corpus (luperson)
    named = only(make_n("pretrain", "CORPUS=mycorpus", root=tmp_path, venv=tmp_path / "venv"), "pretrain")
    assert "data.corpus=mycorpus" in named


def test_make_demo_keeps_its_explicit_config_and_transfer_uses_the_paper_row(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    demo = make_n("demo", root=tmp_path, venv=venv)
    assert demo == [f"{venv}/bin/clasp demo --out runs/demo"]
    line = only(
        make_n("transfer", "TASK=person-search", "DATASET=prw", "DATA=/d", "CKPT=c", root=tmp_path, venv=venv),
        "transfer",
    )
    assert "--config configs/transfer/person_search_prw.yaml" in line
    args = ("TASK=reid", "DATASET=dukemtmc", "DATA=/d", "CKPT=c")
    line = only(make_n("transfer", *args, root=tmp_path, venv=venv), "transfer")
    assert "--config" not in line  # no paper row for DukeMTMC: the code defaults


def readme_make_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line.split("#")[0].strip() for block in blocks for line in block.splitlines() if line.startswith("make ")]


@pytest.mark.parametrize("command", readme_make_commands())
def test_every_readme_make_command_expands(command: str, tmp_path: Path) -> None:
    """``make -n`` of each README line names the stage it documents and, for pre-training, the LUPerson config."""
    verb, *args = shlex.split(command)[1:]
    lines = make_n(verb, *args, root=tmp_path, venv=tmp_path / "venv")
    assert lines, command
    if verb == "pretrain":
        assert "configs/pretrain/vit_b_luperson.yaml" in only(lines, "pretrain")
    if verb == "transfer":
        task, dataset = (dict(a.split("=", 1) for a in args if "=" in a)[k] for k in ("TASK", "DATASET"))
        expected = f"configs/transfer/{task.replace('-', '_')}_{dataset}.yaml"
        assert (REPO / expected).is_file(), f"README runs {command!r} but {expected} does not exist"
        assert f"--config {expected}" in only(lines, "transfer")


# --- paper-row configs --------------------------------------------------------------------------------


def load_row(name: str) -> object:
    config_cls, _ = task_entry(PAPER_ROWS[name])
    return load_config(config_cls, REPO / "configs" / "transfer" / f"{name}.yaml")


@pytest.mark.parametrize("name", sorted(PAPER_ROWS))
def test_paper_row_config_cites_its_reference_and_builds_its_task(name: str) -> None:
    text = (REPO / "configs" / "transfer" / f"{name}.yaml").read_text()
    header = text.split("\n\n")[0]
    assert re.search(r"# Reference: [\w.-]+/[\w.-]+ \S+", header), "header must cite repository and file"
    assert "Deliberate differences" in header and "make transfer" in header
    cfg = load_row(name)
    cfg.backbone.spec = "random:vit_tiny_patch16_224"
    cfg.backbone.timm_kwargs = dict(TINY)
    model = build_task_model(PAPER_ROWS[name], cfg)
    optimizer, _ = build_optimizer(model, optim_of(cfg), steps_per_epoch=10, epochs=2)
    scales = {group["lr_scale"] for group in optimizer.param_groups if "lr_scale" in group}
    if cfg.backbone.layer_decay < 1:
        assert min(scales) == pytest.approx(cfg.backbone.layer_decay**3)  # embeddings of a 2-block ViT
    else:
        assert scales <= {1.0}


def optim_of(cfg: object) -> OptimConfig:
    return cfg.detector.optim if hasattr(cfg, "detector") else cfg.optim


def build_task_model(task: str, cfg: object) -> nn.Module:
    if task == "reid":
        from transfer.reid.model import ReidModel

        return ReidModel(build_backbone(cfg.backbone, tuple(cfg.data.img_size)), 10)
    if task == "attributes":
        from transfer.attributes.train import AttrModel

        return AttrModel(build_backbone(cfg.backbone, tuple(cfg.data.img_size)), 26)
    if task == "pose":
        from transfer.pose.model import PoseModel

        backbone = build_backbone(cfg.backbone, tuple(cfg.data.img_size))
        return PoseModel(backbone, 17, head=cfg.head.kind, channels=cfg.head.channels)
    if task == "detection":
        from transfer.detection.train import detector_for

        return detector_for(cfg, (1024, 2048))
    if task == "parsing":
        from transfer.parsing.model import ParsingModel
        from transfer.parsing.train import _padded

        backbone = build_backbone(cfg.backbone, _padded(tuple(cfg.data.input_size)))
        return ParsingModel(backbone, 20, levels=cfg.head.levels, dim=cfg.head.dim)
    from transfer.person_search.train import build_searcher

    return build_searcher(cfg, 10)


@pytest.mark.parametrize("name", sorted(GLOBAL_BATCH))
@pytest.mark.parametrize("processes", [1, 8])
def test_paper_row_global_batch_is_the_same_on_1_and_8_processes(name: str, processes: int) -> None:
    cfg = load_row(name)
    accelerator = SimpleNamespace(num_processes=processes, is_main_process=False)
    if PAPER_ROWS[name] == "reid":
        from transfer.reid.train import identities_per_batch

        per_process = identities_per_batch(cfg, accelerator) * cfg.data.k_instances
    else:
        per_process = per_process_batch(
            global_batch=cfg.data.global_batch, batch_size=cfg.data.batch_size, num_processes=processes, key="k"
        )
    assert per_process * processes == GLOBAL_BATCH[name]


def test_per_process_batch_rule_and_its_errors() -> None:
    assert per_process_batch(global_batch=0, batch_size=32, num_processes=8, key="k") == 32  # old meaning
    assert per_process_batch(global_batch=512, batch_size=32, num_processes=8, key="k") == 64
    with pytest.raises(ClaspError, match="data.global_batch=16 does not split over 3 processes"):
        per_process_batch(global_batch=16, batch_size=2, num_processes=3, key="data.global_batch")
    with pytest.raises(ClaspError, match="whole groups of 4"):
        per_process_batch(global_batch=64, batch_size=64, num_processes=32, key="data.global_batch", unit=4)


# --- layer-wise lr decay --------------------------------------------------------------------------------


def test_layer_decay_scales_blocks_and_the_schedule_applies_them() -> None:
    backbone = build_backbone(
        BackboneConfig(spec="random:vit_tiny_patch16_224", timm_kwargs=dict(TINY), layer_decay=0.5), (32, 32)
    )
    scales = layer_lr_scales(backbone)
    assert scales["model.pos_embed"] == scales["model.patch_embed.proj.weight"] == 0.5**3
    assert scales["model.blocks.0.attn.qkv.weight"] == 0.5**2
    assert scales["model.blocks.1.mlp.fc2.weight"] == 0.5
    assert scales["model.norm.weight"] == 1.0
    model = nn.Sequential(backbone, nn.Linear(64, 3))
    optimizer, schedule = build_optimizer(
        model, OptimConfig(name="adamw", lr=1e-3, warmup_epochs=0), steps_per_epoch=4, epochs=1
    )
    schedule.step_update(num_updates=0)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lr_of[id(backbone.model.pos_embed)] == pytest.approx(1e-3 * 0.5**3)
    assert lr_of[id(backbone.model.blocks[1].mlp.fc2.weight)] == pytest.approx(1e-3 * 0.5)
    assert lr_of[id(model[1].weight)] == pytest.approx(1e-3)
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay_of[id(backbone.model.pos_embed)] == 0.0 and decay_of[id(model[1].weight)] > 0


def test_layer_decay_outside_0_1_is_rejected() -> None:
    with pytest.raises(ClaspError, match=r"backbone.layer_decay=1.5 must be in \(0, 1\]"):
        build_backbone(
            BackboneConfig(spec="random:vit_tiny_patch16_224", timm_kwargs=dict(TINY), layer_decay=1.5), (32, 32)
        )


# --- pose: UDP and the detections file --------------------------------------------------------------------


def test_udp_encode_decode_round_trip_is_exact_where_the_classic_decoder_is_not() -> None:
    from transfer.pose.heatmaps import (
        decode_heatmaps,
        decode_heatmaps_dark,
        encode_heatmaps,
        from_heatmap_coords,
        to_heatmap_coords,
        udp_scale,
    )

    img_size, stride = (256, 192), 4
    scale = udp_scale(img_size, stride)
    assert scale == pytest.approx((191 / 47, 255 / 63))
    crop_xy = np.array([[40.3, 100.7], [150.55, 33.2], [96.0, 128.0]])
    hm = to_heatmap_coords(crop_xy, stride, udp_scale=scale)
    targets, _ = encode_heatmaps(hm, np.ones(3, bool), (64, 48), 2.0)
    dark = decode_heatmaps_dark(torch.from_numpy(targets)[None].double())[0, :, :2].numpy()
    back = from_heatmap_coords(dark, stride, udp_scale=scale)
    np.testing.assert_allclose(back, crop_xy, atol=1e-3)
    classic = decode_heatmaps(torch.from_numpy(targets)[None].double())[0, :, :2].numpy()
    assert np.abs(from_heatmap_coords(classic, stride, udp_scale=scale) - crop_xy).max() > 0.2


def test_udp_flipped_heatmap_lines_up_with_the_flipped_crop() -> None:
    from transfer.pose.heatmaps import to_heatmap_coords, udp_scale

    scale = udp_scale((256, 192), 4)
    x = np.array([[10.0, 5.0], [100.25, 7.0]])
    mirrored = np.column_stack([191 - x[:, 0], x[:, 1]])  # crop pixel centres at integers, width 192
    a, b = to_heatmap_coords(x, 4, udp_scale=scale), to_heatmap_coords(mirrored, 4, udp_scale=scale)
    np.testing.assert_allclose(b[:, 0], 47 - a[:, 0])  # heatmap width 48: j -> 47 - j


def test_pose_coco_row_evaluates_on_the_detections_file_and_says_what_to_do_without_it(tmp_path: Path) -> None:
    from pipeline.synth.coco_pose import write_coco_pose
    from transfer.pose.datasets import load_coco_keypoints

    cfg = load_row("pose_coco")
    assert cfg.data.detections.endswith("COCO_val2017_detections_AP_H_56_person.json")
    assert cfg.data.encoding == "udp" and cfg.backbone.layer_decay == 0.75
    coco = write_coco_pose(tmp_path / "coco", seed=3, train_images=2, val_images=1, height=64, width=96)
    with pytest.raises(ClaspError, match=r"person_detection_results/COCO_val2017.*data.detections=''"):
        load_coco_keypoints(coco, detections=cfg.data.detections)
    (coco / "person_detection_results").mkdir()
    image_id = load_coco_keypoints(coco).test[0].image_id
    (coco / cfg.data.detections).write_text(
        f'[{{"image_id": {image_id}, "category_id": 1, "bbox": [1, 2, 30, 40], "score": 0.9}}]'
    )
    data = load_coco_keypoints(coco, detections=cfg.data.detections)  # relative to --data
    assert [p.bbox for p in data.test] == [(1.0, 2.0, 30.0, 40.0)] and "detections file" in data.boxes


# --- parsing: multi-scale test ----------------------------------------------------------------------------------


class _HeightLogits(nn.Module):
    """20 logit channels, all equal to the input height: shows which scales were run and how they were averaged."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        return torch.full((b, 20, h, w), float(h))


def test_parsing_multi_scale_test_averages_the_logits_of_each_scale() -> None:
    from transfer.parsing.train import predict_logits

    images = torch.rand(2, 3, 32, 16)
    single = predict_logits(_HeightLogits(), images, flip=True)
    assert single.shape == (2, 20, 32, 16) and torch.all(single == 32)
    multi = predict_logits(_HeightLogits(), images, flip=True, scales=(0.5, 1.0, 1.5))
    assert multi.shape == (2, 20, 32, 16)
    torch.testing.assert_close(multi, torch.full_like(multi, (16 + 32 + 48) / 3))
    assert load_row("parsing_lip").eval.scales == [0.5, 0.75, 1.0, 1.25, 1.5]


# --- detection: mean-teacher EMA ----------------------------------------------------------------------------------


def test_fine_tune_keeps_a_mean_teacher_ema_and_resumes_it(tmp_path: Path) -> None:
    from accelerate import Accelerator
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    ema = ModelEmaV3(model, decay=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [(torch.randn(4, 3), torch.randn(4, 1), 0) for _ in range(3)]
    seen: list[torch.Tensor] = []

    def loss_fn(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        seen.append(net.weight.detach().clone())
        return {"loss": ((net(x) - y) ** 2).mean()}

    schedule = SimpleNamespace(step_update=lambda num_updates: None)
    loop = LoopConfig(epochs=2)
    kwargs = dict(loss_fn=loss_fn, out_dir=tmp_path, run_config=loop, name="t", quiet=True)
    training = Training(model, optimizer, schedule, data, steps_per_epoch=3, set_epoch=lambda e: None)
    fine_tune(Accelerator(cpu=True), loop, training, **kwargs, ema=ema)
    weights = seen[1:] + [model.weight.detach()]  # the weights after each of the 6 steps
    expected = seen[0]
    for w in weights:
        expected = 0.9 * expected + 0.1 * w
    torch.testing.assert_close(ema.module.weight, expected)
    assert not torch.allclose(ema.module.weight, model.weight)
    # a resume restores the average from the checkpoint (not a fresh copy of the weights)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    torch.testing.assert_close(state["ema"]["module.weight"], expected)
    again = nn.Linear(3, 1)
    fresh = ModelEmaV3(again, decay=0.9)
    training = Training(again, torch.optim.SGD(again.parameters(), lr=0.1), schedule, data, 3, lambda e: None)
    fine_tune(Accelerator(cpu=True), loop, training, **kwargs, ema=fresh)
    torch.testing.assert_close(fresh.module.weight, expected)  # both epochs were done: the resume only loads


# --- the paper-row options end to end on tiny synthetic sets ---------------------------------------------------


def test_pose_with_the_coco_row_options_runs_end_to_end(tmp_path: Path) -> None:
    """UDP, layer-wise lr decay, a global batch and clipping through the real run(); the protocol says UDP."""
    from pipeline.synth.coco_pose import write_coco_pose
    from transfer.pose.train import CONFIG, run

    coco = write_coco_pose(tmp_path / "coco", seed=3, train_images=6, val_images=2, height=128, width=192)
    overrides = [f"data_dir={coco}", f"out_dir={tmp_path / 'run'}", "backbone.spec=random:vit_tiny_patch16_224",
                 "backbone.timm_kwargs={depth: 2, embed_dim: 64, num_heads: 2}", "data.img_size=[64,48]",
                 "data.global_batch=8", "data.workers=0", "head.channels=32", "device=cpu", "quiet=true",
                 "data.encoding=udp", "backbone.layer_decay=0.75", "optim.grad_clip=1.0", "epochs=1"]  # fmt: skip
    record = run(load_config(CONFIG, overrides=overrides))
    assert "UDP" in record["protocol"] and 0.0 <= record["metrics"]["AP"] <= 1.0


def test_detection_with_the_citypersons_row_options_runs_end_to_end(tmp_path: Path) -> None:
    """Mean-teacher EMA (evaluated and saved), layer-wise lr decay and a global batch through the real run()."""
    from safetensors.torch import load_file

    from pipeline.synth.citypersons import write_citypersons
    from transfer.detection import train

    synth = write_citypersons(tmp_path / "cp", seed=3, train_images=4, val_images=2, height=128, width=256, cities=2)
    out = tmp_path / "run"
    overrides = [
        f"data_dir={synth}", f"out_dir={out}", "backbone.spec=random:vit_micro", "backbone.timm_kwargs={depth: 1}",
        "data.train_sizes=[128]", "data.test_size=128", "data.max_size=256", "data.global_batch=2", "data.workers=0",
        "data.min_height_px=30", "model.out_channels=16", "model.representation_size=32",
        "model.extra={box_batch_size_per_image: 64}", "epochs=1", "max_steps_per_epoch=2", "quiet=true",
        "device=cpu", "ema_decay=0.5", "backbone.layer_decay=0.7", "optim.name=adam", "optim.weight_decay=0",
    ]  # fmt: skip
    record = train.run(load_config(train.CONFIG, None, overrides))
    assert "mean-teacher EMA 0.5" in record["protocol"]
    assert load_file(str(out / "model.safetensors"))  # the EMA weights were written


def test_parsing_with_the_lip_row_options_runs_end_to_end(tmp_path: Path) -> None:
    from pipeline.synth.lip import write_lip
    from transfer.parsing.train import CONFIG, run

    lip = write_lip(tmp_path / "LIP", seed=3, train_images=6, val_images=2, cameras=3, heights=(48, 96), scene_p=0.4)
    overrides = [f"data_dir={lip}", f"out_dir={tmp_path / 'run'}", "quiet=true", "backbone.spec=random:vit_micro",
                 "backbone.timm_kwargs={depth: 2}", "data.input_size=[64, 48]", "data.global_batch=4",
                 "data.workers=0", "head.dim=16", "epochs=1", "eval.scales=[0.5, 1.0, 1.5]",
                 "backbone.layer_decay=0.75", "device=cpu"]  # fmt: skip
    record = run(load_config(CONFIG, overrides=overrides))
    assert "multi-scale test [0.5, 1.0, 1.5]" in record["protocol"]
    assert 0.0 <= record["metrics"]["mIoU"] <= 1.0


def test_half_body_box_frames_the_upper_or_lower_body_as_vitpose() -> None:
    from transfer.pose.datasets import CropSettings, half_body_box

    kps = np.zeros((17, 3))
    kps[:11] = [[100 + 2 * j, 50 + j, 2] for j in range(11)]  # upper body near y 50..60
    kps[11:] = [[100 + j, 200 + 10 * j, 2] for j in range(6)]  # lower body near y 200..250
    on = CropSettings(img_size=(256, 192), half_body_prob=1.0)
    picks = [half_body_box(kps, 256 / 192, on, np.random.default_rng(seed)) for seed in range(200)]
    centres_y = np.array([centre[1] for centre, _ in picks])
    upper = centres_y < 100
    assert 0.6 < upper.mean() < 0.78  # randn < 0.5 picks the upper body with p ~ 0.69, as the reference
    centre, size = picks[int(np.argmax(upper))]
    np.testing.assert_allclose(centre, kps[:11, :2].mean(axis=0))
    w = 20.0  # the upper joints span 20 x 10 px: the width sets the 192:256 box, scaled 1.5
    np.testing.assert_allclose(size, np.array([w, w * 256 / 192]) * 1.5)
    # few labelled joints or probability 0: no half-body crop
    assert half_body_box(kps, 256 / 192, CropSettings(img_size=(256, 192)), np.random.default_rng(0)) is None
    few = kps.copy()
    few[8:, 2] = 0
    assert half_body_box(few, 256 / 192, on, np.random.default_rng(0)) is None
    assert load_row("pose_coco").data.half_body_prob == 0.3


@pytest.mark.parametrize("name", ["person_search_cuhk_sysu", "person_search_prw"])
def test_person_search_rows_state_global_batches(name: str) -> None:
    """The reference's 2 scenes per step on 1 or 2 processes; on 8 the detector batch cannot split and says so,
    while the embedding's 64 crops split in whole K groups."""
    from transfer.person_search.train import detector_batch, embedding_identities

    cfg = load_row(name)
    for processes, scenes in ((1, 2), (2, 1)):
        accelerator = SimpleNamespace(num_processes=processes, is_main_process=False)
        assert detector_batch(cfg, accelerator) * processes == 2
        assert embedding_identities(cfg, accelerator) * cfg.embed.data.k_instances * processes == 64
        assert detector_batch(cfg, accelerator) == scenes
    eight = SimpleNamespace(num_processes=8, is_main_process=False)
    assert embedding_identities(cfg, eight) * cfg.embed.data.k_instances * 8 == 64
    with pytest.raises(ClaspError, match="detector.global_batch=2 does not split over 8 processes"):
        detector_batch(cfg, eight)
