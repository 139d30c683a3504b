"""Transfer stage: dataset readers (official layouts, clear errors), backbone/prompt choice, sampler, losses,
schedule, and tiny end-to-end re-ID and attribute fine-tunes writing results with the protocol stated."""

from __future__ import annotations

import json
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.transfer_data import TINY_REID, TINY_VIT, id_color, reid_overrides, write_image, write_market, write_pa100k

from pipeline.config import load_config
from pipeline.errors import ClaspError
from transfer.attributes.datasets import load_attr_dataset
from transfer.backbone import BackboneConfig, build_backbone
from transfer.reid.datasets import load_reid_dataset


def write_msmt17(root: Path, version: str) -> Path:
    train_dir, test_dir = {"MSMT17_V1": ("train", "test"), "MSMT17_V2": ("mask_train_v2", "mask_test_v2")}[version]
    base = root / version
    rng = np.random.default_rng(1)
    lists: dict[str, list[str]] = {"train": [], "val": [], "query": [], "gallery": []}
    for pid in range(4):
        for cam in (1, 3):
            rel = f"{pid:04d}/{pid:04d}_{cam:03d}_{cam:02d}_0303morning_0015_0.jpg"
            write_image(base / train_dir / rel, id_color(pid), rng)
            lists["train" if cam == 1 else "val"].append(f"{rel} {pid}")
    for pid in range(2):
        for cam, part in ((2, "query"), (5, "gallery"), (6, "gallery")):
            rel = f"{pid:04d}/{pid:04d}_{cam:03d}_{cam:02d}_0303noon_0020_1.jpg"
            write_image(base / test_dir / rel, id_color(pid + 50), rng)
            lists[part].append(f"{rel} {pid}")
    for part, lines in lists.items():
        (base / f"list_{part}.txt").write_text("\n".join(lines) + "\n")
    return base


def write_rethinking_pickle(
    folder: Path, file_name: str, *, zero_shot: bool, image_dir: str, protocol: int = pickle.DEFAULT_PROTOCOL
) -> Path:
    """A dataset description pickled exactly as Rethinking_of_PAR does: an easydict.EasyDict tree."""

    class EasyDict(dict):  # the attribute-setting dict subclass of the easydict package
        def __setattr__(self, name, value):
            super().__setattr__(name, value)
            super().__setitem__(name, value)

    EasyDict.__module__, EasyDict.__qualname__ = "easydict", "EasyDict"
    fake = types.ModuleType("easydict")
    fake.EasyDict = EasyDict
    sys.modules["easydict"] = fake
    try:
        rng = np.random.default_rng(3)
        n = 20
        info = EasyDict()
        info.description = "peta"
        info.root = "/mnt/authors/machine/PETA/" + image_dir  # not present here: resolved beside the pickle
        info.image_name = [f"{i + 1:05}.png" for i in range(n)]
        label = rng.integers(0, 2, (n, 6)).astype(np.uint8)
        label[0, 1] = 2  # RAP's "uncertain"
        info.label = label
        info.attr_name = [f"attr{i}" for i in range(6)]
        info.partition = EasyDict()
        if zero_shot:
            info.partition.trainval = np.arange(0, 14)
            info.partition.test = np.arange(14, 20)
        else:
            info.label_idx = EasyDict()
            info.label_idx.eval = [4, 1, 2, 0]
            info.partition.trainval = [np.arange(0, 14), np.arange(6, 20)]
            info.partition.test = [np.arange(14, 20), np.arange(0, 6)]
        for name in info.image_name:
            write_image(folder / image_dir / name, (100, 100, 100), rng)
        path = folder / file_name
        path.write_bytes(pickle.dumps(info, protocol=protocol))
    finally:
        del sys.modules["easydict"]
    return path


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("market")
    write_market(root / "Market-1501-v15.09.15")
    return root


@pytest.fixture(scope="module")
def pa100k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pa100k(tmp_path_factory.mktemp("PA100k"))


# --- re-ID readers --------------------------------------------------------------------------------


def test_market_reader_relabels_train_and_applies_junk_rules(market: Path) -> None:
    data = load_reid_dataset("market1501", market)
    assert len(data.train) == 32 and sorted({p for _, p, _ in data.train}) == list(range(8))
    assert {p for _, p, _ in data.query} == {11, 12, 13, 14}  # junk -1 query dropped
    gallery_ids = [p for _, p, _ in data.gallery]
    assert -1 not in gallery_ids and 0 in gallery_ids  # junk dropped, distractor kept
    assert {c for _, _, c in data.query} == {0} and {c for _, _, c in data.gallery} == {1}
    assert "junk id -1 dropped" in data.layout
    # the same folder is found from its parent, the folder itself, or torchreid's market1501/<folder>
    assert load_reid_dataset("market1501", market / "Market-1501-v15.09.15").summary() == data.summary()


def test_market_reader_names_the_missing_folder(tmp_path: Path) -> None:
    base = write_market(tmp_path / "Market-1501-v15.09.15")
    for img in (base / "bounding_box_test").iterdir():
        img.unlink()
    (base / "bounding_box_test").rmdir()
    with pytest.raises(ClaspError, match=r"incomplete: missing .*bounding_box_test"):
        load_reid_dataset("market1501", tmp_path)
    with pytest.raises(ClaspError, match=r"no market1501 folders .*expected"):
        load_reid_dataset("market1501", tmp_path / "Market-1501-v15.09.15" / "query")


def test_market_reader_rejects_foreign_file_names(tmp_path: Path) -> None:
    base = write_market(tmp_path / "Market-1501-v15.09.15")
    write_image(base / "query" / "IMG_0001.jpg", (0, 0, 0), np.random.default_rng(0))
    with pytest.raises(ClaspError, match="IMG_0001.jpg.*<pid>_c<camera>"):
        load_reid_dataset("market1501", tmp_path)


def test_duke_and_cuhk03_np_use_the_market_folder_convention(tmp_path: Path) -> None:
    write_market(tmp_path / "DukeMTMC-reID", duke_names=True)
    duke = load_reid_dataset("dukemtmc", tmp_path)
    assert duke.summary()["train_ids"] == 8 and duke.name == "dukemtmc"
    write_market(tmp_path / "cuhk03-np" / "detected", ext=".png")
    cuhk = load_reid_dataset("cuhk03-np-detected", tmp_path)
    assert cuhk.summary()["query_images"] == 4 and all(p.endswith(".png") for p, _, _ in cuhk.query)
    with pytest.raises(ClaspError, match="cuhk03-np-labeled"):
        load_reid_dataset("cuhk03-np-labeled", tmp_path)


@pytest.mark.parametrize("version", ["MSMT17_V1", "MSMT17_V2"])
def test_msmt17_reads_both_layouts_and_states_the_version(tmp_path: Path, version: str) -> None:
    write_msmt17(tmp_path, version)
    data = load_reid_dataset("msmt17", tmp_path)
    assert version in data.layout and "list_train+list_val" in data.layout
    assert len(data.train) == 8 and {c for _, _, c in data.train} == {0, 2}  # camera = 3rd '_' field - 1
    assert {c for _, _, c in data.query} == {1} and len(data.gallery) == 4
    train_only = load_reid_dataset("msmt17", tmp_path, msmt17_with_val=False)
    assert len(train_only.train) == 4 and "training on list_train)" in train_only.layout


def test_msmt17_partial_layout_names_the_missing_list(tmp_path: Path) -> None:
    base = write_msmt17(tmp_path, "MSMT17_V1")
    (base / "list_gallery.txt").unlink()
    with pytest.raises(ClaspError, match=r"missing .*list_gallery.txt"):
        load_reid_dataset("msmt17", tmp_path)


def test_unknown_dataset_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ClaspError, match="market1501, dukemtmc"):
        load_reid_dataset("viper", tmp_path)
    with pytest.raises(ClaspError, match="pa100k, peta"):
        load_attr_dataset("celeba", tmp_path)


# --- attribute readers ----------------------------------------------------------------------------


def test_pa100k_reader_reads_annotation_mat(pa100k: Path) -> None:
    data = load_attr_dataset("pa100k", pa100k)
    assert data.attr_names == ["Female", "Hat", "Backpack", "boots"]
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 24, "val": 6, "test": 10, "trainval": 30}
    paths, labels = data.split("test")
    assert Path(paths[0]).name == "000031.jpg" and labels.shape == (10, 4)
    assert Path(data.split("trainval")[0][-1]).name == "000030.jpg"


def test_pa100k_errors_name_the_file(tmp_path: Path, pa100k: Path) -> None:
    with pytest.raises(ClaspError, match="annotation.mat not found"):
        load_attr_dataset("pa100k", tmp_path)
    (tmp_path / "annotation.mat").write_bytes((pa100k / "annotation.mat").read_bytes())
    with pytest.raises(ClaspError, match="no PA-100K image folder"):
        load_attr_dataset("pa100k", tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(ClaspError, match="000001.jpg.*does not exist"):
        load_attr_dataset("pa100k", tmp_path)


def test_rethinking_pickle_all_split_selects_eval_attributes(tmp_path: Path) -> None:
    write_rethinking_pickle(tmp_path, "dataset_all.pkl", zero_shot=False, image_dir="images")
    assert "easydict" not in sys.modules
    data = load_attr_dataset("peta", tmp_path)
    assert data.attr_names == ["attr4", "attr1", "attr2", "attr0"]  # label_idx.eval order
    assert len(data.splits["trainval"]) == 14 and data.splits["test"][0] == 14  # partition 0
    assert data.labels.max() <= 1  # RAP's 2 mapped to 0
    other = load_attr_dataset("peta", tmp_path, partition=1)
    assert other.splits["test"][0] == 0
    assert Path(data.image_paths[0]).parent == tmp_path / "images"


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_rethinking_pickle_reads_at_every_protocol(tmp_path: Path, protocol: int) -> None:
    write_rethinking_pickle(tmp_path, "dataset_all.pkl", zero_shot=False, image_dir="images", protocol=protocol)
    data = load_attr_dataset("peta", tmp_path)
    assert data.attr_names == ["attr4", "attr1", "attr2", "attr0"] and data.labels.shape == (20, 4)


class _RunsCode:
    """What a crafted dataset pickle would hold: unpickling it calls ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_rethinking_pickle_refuses_a_pickle_that_would_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    payload = {"image_name": ["a.png"], "label": _RunsCode(marker), "attr_name": ["x"], "partition": {}}
    (tmp_path / "dataset_all.pkl").write_bytes(pickle.dumps(payload))
    with pytest.raises(ClaspError, match=r"dataset_all.pkl names posix.system, .*refused"):
        load_attr_dataset("peta", tmp_path)
    assert not marker.exists()


def test_rethinking_zero_shot_pickle_evaluates_all_attributes(tmp_path: Path) -> None:
    write_rethinking_pickle(tmp_path, "dataset_zs_run0.pkl", zero_shot=True, image_dir="RAP_dataset")
    data = load_attr_dataset("rap_zs", tmp_path)
    assert len(data.attr_names) == 6 and "dataset_zs_run0.pkl" in data.layout
    with pytest.raises(ClaspError, match="dataset_all.pkl not found"):
        load_attr_dataset("rapv2", tmp_path)


# --- backbone, sampler, losses, schedule ----------------------------------------------------------


class _FakeMoE(torch.nn.Module):
    """Stands in for a MoE export: tokens depend on the prompt weights so gradients reach them."""

    prompt_names = ("instance", "part", "attribute")
    has_moe = True
    num_features, num_prefix_tokens = 4, 1

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, 4)
        self.seen: list = []

    def forward_features(self, x: torch.Tensor, prompt=None) -> torch.Tensor:
        self.seen.append(prompt)
        tokens = self.proj(x.flatten(2).transpose(1, 2))
        if isinstance(prompt, torch.Tensor):
            tokens = tokens * (1 + prompt @ torch.arange(3.0))
        return tokens


def test_backbone_prompt_choices(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import transfer.backbone as tb

    monkeypatch.setattr(
        tb, "_load_clasp", lambda path, img_size, *_: (_FakeMoE(), {"mean": [0.5] * 3, "std": [0.5] * 3})
    )
    images = torch.rand(2, 3, 4, 2)
    learned = build_backbone(BackboneConfig(spec=str(tmp_path), prompt_mix={"instance": 0.8}), (4, 2))
    assert learned.mean == (0.5, 0.5, 0.5)
    init = learned.current_prompt().detach()
    assert init[0] > 0.9 and abs(float(init.sum()) - 1) < 1e-6
    learned(images).sum().backward()
    assert learned.prompt_logits.grad is not None and learned.prompt_logits.grad.abs().sum() > 0
    assert "learned mix: instance" in learned.describe_prompt()
    fixed = build_backbone(BackboneConfig(spec=str(tmp_path), prompt="part"), (4, 2))
    fixed(images)
    assert fixed.model.seen[-1] == "part"
    mix = build_backbone(
        BackboneConfig(spec=str(tmp_path), prompt="mix", prompt_mix={"part": 1, "attribute": 3}), (4, 2)
    )
    assert torch.allclose(mix.current_prompt(), torch.tensor([0.0, 0.25, 0.75]))
    with pytest.raises(ClaspError, match="unknown prompts"):
        build_backbone(BackboneConfig(spec=str(tmp_path), prompt_mix={"pose": 1.0}), (4, 2))


def test_plain_backbone_ignores_learned_prompt_but_rejects_a_fixed_one() -> None:
    kw = {"depth": 1, "embed_dim": 32, "num_heads": 2}
    plain = build_backbone(BackboneConfig(spec="random:vit_tiny_patch16_224", timm_kwargs=kw), (32, 16))
    assert plain(torch.rand(2, 3, 32, 16)).shape == (2, 32)
    assert plain.describe_prompt().startswith("none")
    with pytest.raises(ClaspError, match="no prompt-controlled MoE"):
        build_backbone(BackboneConfig(spec="random:vit_tiny_patch16_224", prompt="part", timm_kwargs=kw), (32, 16))
    micro = build_backbone(BackboneConfig(spec="random:vit_micro"), (32, 16))  # CLASP's own arch names
    assert micro.num_features == 128 and len(micro.model.blocks) == 4
    with pytest.raises(ClaspError, match="timm has no model"):
        build_backbone(BackboneConfig(spec="random:not_a_model"), (32, 16))
    with pytest.raises(ClaspError, match="not a folder"):
        build_backbone(BackboneConfig(spec="/no/such/export"), (32, 16))


def test_pk_sampler_batches_hold_p_identities_with_k_images() -> None:
    from transfer.reid.sampler import PKBatchSampler

    pids = [0] * 5 + [1] * 4 + [2] * 1 + [3] * 8 + [4] * 3
    sampler = PKBatchSampler(pids, p=3, k=2, seed=0)
    batches = list(sampler)
    assert 0 < len(batches) == len(sampler)
    for batch in batches:
        ids = [pids[i] for i in batch]
        assert len(batch) == 6 and len(set(ids)) == 3 and all(ids.count(p) == 2 for p in set(ids))
    assert list(sampler) == batches  # same epoch -> same batches (resume)
    sampler.set_epoch(1)
    assert list(sampler) != batches
    with pytest.raises(ClaspError, match="needs >= 6 training identities"):
        PKBatchSampler(pids, p=6, k=2)


def test_batch_hard_triplet_hand_case() -> None:
    from transfer.reid.losses import batch_hard_triplet

    feats = torch.tensor([[0.0], [1.0], [3.0], [3.5]])
    pids = torch.tensor([0, 0, 1, 1])
    # anchors: hardest pos / hardest neg = (1, 3), (1, 2), (0.5, 2), (0.5, 2.5)
    gaps = torch.tensor([1 - 3, 1 - 2, 0.5 - 2, 0.5 - 2.5])
    assert batch_hard_triplet(feats, pids, 1.2).item() == pytest.approx(torch.relu(gaps + 1.2).mean().item())
    assert batch_hard_triplet(feats, pids, None).item() == pytest.approx(
        torch.nn.functional.softplus(gaps).mean().item()
    )


def test_weighted_bce_uses_positive_ratio_weights() -> None:
    from transfer.attributes.train import weighted_bce

    logits = torch.zeros(1, 2)
    targets = torch.tensor([[1.0, 0.0]])
    ratio = torch.tensor([0.2, 0.3])
    expected = np.log(2) * (np.exp(1 - 0.2) + np.exp(0.3))
    assert weighted_bce(logits, targets, ratio).item() == pytest.approx(expected, rel=1e-6)
    assert weighted_bce(logits, targets, None).item() == pytest.approx(2 * np.log(2), rel=1e-6)


def test_schedule_warms_up_then_follows_cosine() -> None:
    from transfer.optim import OptimConfig, build_optimizer

    model = torch.nn.Linear(2, 2)
    cfg = OptimConfig(name="sgd", lr=0.1, warmup_epochs=1, warmup_lr_factor=0.01, min_lr_factor=0.0)
    opt, sched = build_optimizer(model, cfg, steps_per_epoch=10, epochs=3)
    lrs = []
    for step in range(30):
        sched.step_update(num_updates=step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.001) and lrs[10] == pytest.approx(0.1)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11], strict=True))  # warmup rises
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False)) and lrs[-1] < 0.01  # cosine falls


# --- end to end -----------------------------------------------------------------------------------


def _reid_cfg(data: Path, out: Path, *extra: str):
    from transfer.reid.train import ReidConfig

    overrides = [
        f"data_dir={data}",
        f"out_dir={out}",
        "dataset=market1501",
        *TINY_REID,
        "quiet=true",
        *extra,
    ]
    return load_config(ReidConfig, overrides=overrides)


def test_reid_end_to_end_writes_results_with_protocol(market: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    out = tmp_path / "reid"
    args = ["transfer", "reid", "--data", str(market), "--dataset", "market1501", "--out", str(out), "--quiet"]
    args += [a for a in reid_overrides()]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.json").read_text())
    assert record["task"] == "reid" and record["dataset"] == "market1501"
    assert "same-id same-camera gallery images removed" in record["protocol"]
    for scores in (record["metrics"], record["metrics_reranked"]):  # headline numbers are without re-ranking
        assert 0 <= scores["mAP"] <= 1 and 0 <= scores["rank1"] <= 1 and scores["valid_queries"] == 4
    assert record["metrics_reranked"]["k1"] == 4
    assert record["training"]["steps"] > 0 and np.isfinite(record["training"]["final_loss"])
    markdown = (out / "results.md").read_text()
    assert "Market-1501 protocol" in markdown and "| mAP (no re-ranking) |" in markdown
    assert (out / "model.safetensors").is_file() and (out / "config.yaml").is_file()
    assert not (out / "checkpoint.pt").exists()
    # a finished run is not redone; a different config in the same folder is refused
    from transfer.reid.train import run

    again = run(_reid_cfg(market, out, "eval.rerank=true", "eval.k1=4", "eval.k2=2"))
    assert again["created_utc"] == record["created_utc"]
    with pytest.raises(ClaspError, match="different configuration"):
        run(_reid_cfg(market, out, "epochs=3"))


def test_reid_resumes_after_an_interruption(market: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transfer.reid.train as reid_train

    cfg = _reid_cfg(market, tmp_path, "epochs=1")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(reid_train, "evaluate", crash)
    with pytest.raises(KeyboardInterrupt):
        reid_train.run(cfg)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # plain types only
    assert state["epoch"] == 1 and not (tmp_path / "results.json").exists()
    monkeypatch.undo()
    record = reid_train.run(cfg)  # resumes after the finished epoch: evaluates only
    assert record["training"]["steps"] == state["step"] and len(record["history"]) == 1


def test_attributes_end_to_end_writes_results_with_protocol(pa100k: Path, tmp_path: Path) -> None:
    from transfer.attributes.train import AttrConfig, run

    overrides = [f"data_dir={pa100k}", f"out_dir={tmp_path}", "dataset=pa100k", *TINY_VIT, "data.img_size=[32,16]"]
    overrides += ["data.batch_size=8", "data.workers=0", "epochs=2", "optim.lr=1e-3", "device=cpu", "quiet=true"]
    record = run(load_config(AttrConfig, overrides=overrides))
    assert record["task"] == "attributes" and "Rethinking_of_PAR get_pedestrian_metrics" in record["protocol"]
    for key in ("mA", "accuracy", "precision", "recall", "f1"):
        assert 0 <= record["metrics"][key] <= 1
    assert record["per_attribute"]["boots"]["pos_recall"] == 0.0  # no positives: eps rule
    assert "trainval" in record["layout"] and record["data"]["test_images"] == 10
    markdown = (tmp_path / "results.md").read_text()
    assert "| mA |" in markdown and "label-based mA" in markdown


# --- the synthetic world, through the same readers ------------------------------------------------


def test_synthetic_world_layouts_read_like_real_data(request: pytest.FixtureRequest) -> None:
    synth = pytest.importorskip("pipeline.synth", reason="the synthetic world generator has not landed yet")
    if not hasattr(synth, "write_world"):
        pytest.skip("pipeline.synth.write_world has not landed yet")
    synth_world = request.getfixturevalue("synth_world")
    reid = load_reid_dataset("market1501", synth_world / "market1501")
    summary = reid.summary()
    assert summary["train_ids"] > 0 and summary["query_images"] > 0 and summary["gallery_images"] > 0
    attrs = load_attr_dataset("pa100k", synth_world / "pa100k")
    assert len(attrs.attr_names) == 26 and len(attrs.splits["test"]) > 0


@pytest.mark.parametrize("moe", [True, False])
def test_clasp_export_loads_with_prompt_choice(tmp_path: Path, moe: bool) -> None:
    export = pytest.importorskip("pretrain.export", reason="the backbone export has not landed yet")
    from pipeline.config import to_dict
    from pretrain.backbone import create_backbone
    from pretrain.model_config import ModelConfig, MoEConfig

    model_cfg = ModelConfig(
        arch="vit_micro", img_size=(32, 16), moe=MoEConfig(enabled=moe, blocks="last_half", num_experts=2, top_k=1)
    )
    net = create_backbone(model_cfg.arch, img_size=model_cfg.img_size, moe=model_cfg.moe)
    ckpt = tmp_path / "train.pt"
    state = {f"teacher.backbone.{k}": v for k, v in net.state_dict().items()}
    torch.save({"model": state, "config": {"model": to_dict(model_cfg)}, "step": 3}, ckpt)
    out = export.export_backbone(ckpt, tmp_path / "backbone", card={})

    cfg = BackboneConfig(spec=str(out), prompt_mix={"instance": 0.8, "attribute": 0.2})
    backbone = build_backbone(cfg, (48, 16))  # another input size resamples the position embedding
    feats = backbone(torch.rand(2, 3, 48, 16))
    assert feats.shape == (2, backbone.num_features) and torch.isfinite(feats).all()
    if moe:
        assert backbone.prompt_names == ("instance", "part", "attribute")
        feats.sum().backward()
        assert backbone.prompt_logits.grad is not None
        assert "learned mix" in backbone.describe_prompt()
    else:
        assert backbone.describe_prompt().startswith("none")


@pytest.mark.parametrize(
    ("task", "dataset", "extra"),
    [
        ("reid", "market1501", ["data.p_identities=4", "data.k_instances=2", "optim.warmup_epochs=0.5"]),
        ("attributes", "pa100k", ["data.batch_size=16", "optim.lr=1e-3"]),
    ],
)
def test_synthetic_world_end_to_end(
    request: pytest.FixtureRequest, tmp_path: Path, task: str, dataset: str, extra: list[str]
) -> None:
    synth = pytest.importorskip("pipeline.synth", reason="the synthetic world generator has not landed yet")
    if not hasattr(synth, "write_world"):
        pytest.skip("pipeline.synth.write_world has not landed yet")
    from transfer.registry import task_entry

    world = request.getfixturevalue("synth_world")
    config_cls, run = task_entry(task)
    overrides = [
        f"data_dir={world / dataset}",
        f"dataset={dataset}",
        f"out_dir={tmp_path}",
        "backbone.spec=random:vit_micro",
    ]
    overrides += ["data.img_size=[32,16]", "data.workers=0", "epochs=2", "device=cpu", "quiet=true", *extra]
    record = run(load_config(config_cls, overrides=overrides))
    headline = "mAP" if task == "reid" else "mA"
    assert 0 <= record["metrics"][headline] <= 1 and record["training"]["steps"] > 0
    assert record["protocol"] in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["metrics"] == record["metrics"]


def test_timm_weights_from_a_local_file(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    kw = {"depth": 1, "embed_dim": 32, "num_heads": 2}
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=(32, 16), **kw)
    weights = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    backbone = build_backbone(BackboneConfig(spec=f"timm:vit_tiny_patch16_224@{weights}", timm_kwargs=kw), (32, 16))
    assert torch.equal(backbone.model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert backbone.source.startswith("timm:vit_tiny_patch16_224@")
    with pytest.raises(ClaspError, match="does not exist"):
        build_backbone(BackboneConfig(spec="timm:vit_tiny_patch16_224@/no/such.safetensors"), (32, 16))
