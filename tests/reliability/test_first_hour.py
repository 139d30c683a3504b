"""A new user's first hour through the real ``clasp`` console script (issue 18): values that would train
silently wrong or crash deep inside a stage are refused when the config is read, every setting is
discoverable, Ctrl-C and failures leave one line and no empty folders, audit can fail a CI job.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import yaml
from helpers.fault_injection import pause_write_env
from helpers.reliability import (
    CLASP,
    CORPUS,
    REPO,
    assert_user_error,
    child_env,
    clasp,
    clasp_all,
    copy_root,
    pretrain_overrides,
)

TINY_REID = [
    "backbone.spec=random:vit_tiny_patch16_224",
    "backbone.timm_kwargs={depth: 1, embed_dim: 32, num_heads: 2}",
    "data.img_size=[32,16]",
    "data.p_identities=2",
    "data.k_instances=2",
    "data.workers=0",
    "optim.warmup_epochs=0",
    "max_steps_per_epoch=2",
    "eval.batch_size=16",
    "device=cpu",
]


def test_values_that_would_train_wrong_or_crash_are_refused_before_any_work(tmp_path: Path) -> None:
    cases = {
        "neg_lr": (["optim.lr=-1"], "optim.lr=-1.0", "must be > 0"),
        "neg_batch": (["data.batch_size=-4"], "data.batch_size=-4", "must be > 0"),
        "no_epochs": (["optim.epochs=0"], "optim.epochs=0", "must be >= 1"),
        "patch": (["model.img_size=[30,16]"], "model.img_size=[30, 16]", "not a multiple of model.patch_size=8"),
        "warmup": (["optim.warmup_epochs=5"], "optim.warmup_epochs=5", "longer than the run (optim.epochs=2)"),
    }
    runs = clasp_all(*[["pretrain", *pretrain_overrides(tmp_path, tmp_path / k, *v[0])] for k, v in cases.items()])
    for (name, (_, *needles)), done in zip(cases.items(), runs, strict=True):
        assert_user_error(done, *needles)
        assert not (tmp_path / name).exists(), name


def test_command_line_options_are_checked_like_config_values(world: Path, tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    label_run, ingest_run, transfer_run, clip_run, source_run = clasp_all(
        ["label", "--root", str(tmp_path), "--corpus", CORPUS, "--batch-size", "-4"],
        ["ingest", "--source", str(world / "luperson"), "--corpus", "x", "--root", str(tmp_path / "root"),
         "--images-per-shard", "0"],
        ["transfer", "reid", "--data", str(world / "market1501"), "--dataset", "market1501", "--out",
         str(tmp_path / "reid"), "epochs=0"],
        ["clip-train", "--pairs", str(world / "pairs.csv"), "--out", str(tmp_path / "clip"), "--epochs", "0"],
        ["ingest", "--source", str(not_a_folder), "--corpus", "x", "--root", str(tmp_path / "root2")],
    )  # fmt: skip
    assert_user_error(label_run, "batch_size=-4", "must be > 0")
    assert_user_error(ingest_run, "images_per_shard=0", "must be > 0")
    assert_user_error(transfer_run, "epochs=0", "must be >= 1")  # it used to evaluate an untrained head, exit 0
    assert_user_error(clip_run, "epochs=0", "must be >= 1")
    assert_user_error(source_run, str(not_a_folder), "not a directory")
    assert not any((tmp_path / name).exists() for name in ("root", "reid", "clip", "root2"))  # root2: only a lock


def test_config_command_prints_every_setting_as_loadable_yaml(tmp_path: Path) -> None:
    from pipeline.config import load_config, to_dict
    from pretrain.config import PretrainConfig

    pretrain_run, reid_run, bad_run, version_run = clasp_all(
        ["config", "pretrain"], ["config", "transfer", "reid"], ["config", "pretrian"], ["--version"]
    )
    assert pretrain_run.returncode == 0, pretrain_run.stderr
    path = tmp_path / "pretrain.yaml"
    path.write_text(pretrain_run.stdout)
    assert to_dict(load_config(PretrainConfig, path)) == to_dict(PretrainConfig())  # copied as is, it loads
    leaves = [line for line in pretrain_run.stdout.splitlines() if re.match(r"\s*\w+: [^#\s]", line)]
    assert len(leaves) > 60 and all(re.fullmatch(r"\s*\w+: .*  # .+ \(.+\)", line) for line in leaves), leaves
    assert "  batch_size: 64  # images per process per micro-batch (int, > 0)" in pretrain_run.stdout
    assert "optim:" in pretrain_run.stdout and "  lr: 0.0005  # " in pretrain_run.stdout
    assert yaml.safe_load(reid_run.stdout)["epochs"] == 120
    assert_user_error(bad_run, "'pretrian'", "choose synth")
    assert re.fullmatch(r"clasp \S+\n", version_run.stdout), version_run


def test_help_shows_flags_as_flags_and_examples_that_load(tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.ingest import IngestConfig
    from pretrain.config import PretrainConfig
    from transfer.reid.train import ReidConfig

    helps = clasp_all(["ingest", "--help"], ["pretrain", "--help"], ["transfer", "--help"])
    for done, cls in zip(helps, (IngestConfig, PretrainConfig, ReidConfig), strict=True):
        text = done.stdout
        assert done.returncode == 0 and "Examples:" in text and "clasp config" in text, text
        assert "<bool>" not in text  # `--quiet <bool>` read as if it took a value
        example = re.search(r"e\.g\. (.+?)\s*$", " ".join(text.split("Options:")[0].split()))
        load_config(cls, overrides=example.group(1).split())  # the overrides example uses keys of this command
    assert "--overwrite " in helps[0].stdout and "--images-per-shard <int>" in helps[0].stdout


def test_audit_exit_status_follows_fail_on(labelled: tuple[Path, str], tmp_path: Path) -> None:
    root, labelset = labelled
    base = ["audit", "--root", str(root), "--corpus", CORPUS, "--labelset", labelset, "mosaics=false", "--quiet"]
    never, default, bad, loud = clasp_all(
        [*base, "--out", str(tmp_path / "a"), "--fail-on", "never"],
        [*base, "--out", str(tmp_path / "b")],
        [*base, "--out", str(tmp_path / "c"), "--fail-on", "sometimes"],
        [*base[:-1], "--out", str(tmp_path / "d"), "--fail-on", "never"],
    )
    # the one progress display (tqdm, as in every stage): count, elapsed<ETA, rate; nothing with --quiet
    assert re.search(r"audit: 100%.*\| (\d+)/\1 \[[\d:]+<[\d:]+, +[\d.]+ ?(step/s|s/step)", loud.stderr), loud.stderr
    assert "audit:" not in never.stderr
    assert never.returncode == 0, never.stderr
    findings = json.loads((tmp_path / "b" / "summary.json").read_text())["findings"]
    errors = sum(f["severity"] == "error" for f in findings)
    assert errors > 0, findings  # random-CLIP labels put parts out of order: the audit must say so
    assert default.returncode == 1 and f"{errors} finding(s) at level error" in default.stderr, default.stderr
    assert_user_error(bad, "--fail-on 'sometimes'", "error, warning or never")


def test_transfer_prints_its_headline_and_where_the_table_is(world: Path, tmp_path: Path) -> None:
    out = tmp_path / "reid"
    done = clasp("transfer", "reid", "--data", str(world / "market1501"), "--dataset", "market1501",
                 "--out", str(out), "epochs=1", *TINY_REID, "optim.warmup_epochs=5")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "optim.warmup_epochs=5 is longer than the run (1 epochs)" in done.stderr  # was cut silently
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("reid: mAP (no re-ranking) ") and f"(table: {out / 'results.md'})" in last, last


def test_ctrl_c_prints_one_line_and_leaves_nothing_half_written(labelled: tuple[Path, str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = child_env(**pause_write_env("step-*.pt", 2))  # stall in the middle of the second checkpoint write
    args = pretrain_overrides(labelled[0], out, "data.workers=2", "checkpoint_every=4")  # workers busy mid-epoch
    proc = subprocess.Popen([str(CLASP), "pretrain", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        deadline, marks = time.monotonic() + 120, []
        while not marks and time.monotonic() < deadline and proc.poll() is None:
            marks = list(tmp_path.rglob("*.paused"))
            time.sleep(0.05)
        assert marks and proc.poll() is None, proc.communicate()
        marks[0].unlink()  # the test's marker
        os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C does: to the main process and its DataLoader workers
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert [line for line in stderr.splitlines() if line.strip()] == ["interrupted: rerun the same command to resume"]
    assert not list((out / "checkpoints").glob("*.tmp-*"))  # the half-written checkpoint is gone
    assert [p.name for p in (out / "checkpoints").glob("step-*.pt")] == ["step-000000004.pt"]


def test_files_that_are_not_what_they_claim_get_one_line(labelled: tuple[Path, str], tmp_path: Path) -> None:
    root, labelset = labelled
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    truncated = copy_root(root, tmp_path / "root")
    shard = sorted((truncated / CORPUS / "labels" / labelset).glob("*.parquet"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a copy killed half-way
    export_run, clip_run, audit_run = clasp_all(
        ["export", str(junk), "--out", str(tmp_path / "release")],
        ["label", "--root", str(root), "--corpus", CORPUS, "--clip", "clasp-vit-tiny-8", "--clip-checkpoint", str(junk),
         "--device", "cpu", "--allow-random-weights"],
        ["audit", "--root", str(truncated), "--corpus", CORPUS, "--out", str(tmp_path / "audit")],
    )  # fmt: skip
    assert_user_error(export_run, str(junk), "is not a pre-training checkpoint")
    assert_user_error(clip_run, f"--clip-checkpoint {junk} is not an open_clip checkpoint")
    assert_user_error(audit_run, f"label shard {shard} is unreadable", "re-run `clasp label`")
    assert not (tmp_path / "release").exists() and not (tmp_path / "audit").exists()


def test_hub_clip_weights_offline_fail_in_seconds(labelled: tuple[Path, str], tmp_path: Path) -> None:
    args = ["label", "--root", str(labelled[0]), "--corpus", CORPUS, "--clip", "ViT-B-16:openai", "--device", "cpu"]
    empty_cache = {"HF_HOME": str(tmp_path / "hf"), "HOME": str(tmp_path)}
    offline = clasp(*args, env={**empty_cache, "HF_HUB_OFFLINE": "1"})
    unreachable = clasp(*args, env={**empty_cache, "HF_ENDPOINT": "http://127.0.0.1:9"})  # nothing listens there
    assert_user_error(offline, "'openai' for ViT-B-16 are not in the local cache", "HF_HUB_OFFLINE is set")
    assert_user_error(unreachable, "http://127.0.0.1:9 cannot be reached", "--clip-checkpoint")


def test_rerun_into_a_run_of_another_model_names_the_setting(labelled: tuple[Path, str], tmp_path: Path) -> None:
    first = clasp("pretrain", *pretrain_overrides(labelled[0], tmp_path / "run", "max_steps=1"))
    assert first.returncode == 0, first.stderr[-2000:]
    again = clasp("pretrain", *pretrain_overrides(labelled[0], tmp_path / "run", "model.arch=vit_tiny"))
    assert_user_error(again, "model.arch was 'vit_micro', is 'vit_tiny' now", "out=")


def test_audit_mosaics_rank_by_probability_one_image_per_video(labelled: tuple[Path, str], tmp_path: Path) -> None:
    from labeling.audit import AuditConfig, AuditResult, connect, run_audit
    from labeling.audit_metrics import select_mosaics, video_of

    root, labelset = labelled
    cfg = AuditConfig(root=str(root), corpus=CORPUS, labelset=labelset, out=str(tmp_path / "audit"), quiet=True,
                      mosaic_per_attribute=2, mosaic_parts=0)  # fmt: skip
    page = run_audit(cfg).read_text()
    assert "Highest (left) and lowest (right) attribute probability p" in page and "confident images" not in page
    con, ctx = connect(cfg)
    try:
        selected = select_mosaics(con, ctx, AuditResult(ctx, {}, {}, [], {}, {}, 0))
    finally:
        con.close()
    videos = {video_of(key) for key in ctx_keys(root)}
    assert len(videos) >= 2
    for entry in selected["attributes"]:
        for side in (entry["most"], entry["least"]):
            assert len(side) == 2 and len({video_of(key) for key in side}) == 2, entry  # not two frames of one video


def ctx_keys(root: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(root / CORPUS / "images" / "manifest.parquet", columns=["key"]).column("key").to_pylist()


def test_library_chatter_follows_the_log_level(labelled: tuple[Path, str], tmp_path: Path) -> None:
    args = ["--clip", "clasp-vit-tiny-8", "--allow-random-weights", "--device", "cpu", "--resolution", "64x32",
            "-j", "0", "-b", "8", "-q"]  # fmt: skip
    roots = [copy_root(labelled[0], tmp_path / name) for name in ("a", "b")]
    default, info = (
        clasp("label", "--root", str(root), "--corpus", CORPUS, *args, env=env)
        for root, env in zip(roots, ({}, {"CLASP_LOG_LEVEL": "info"}), strict=True)
    )
    assert default.returncode == 0 and info.returncode == 0, (default.stderr, info.stderr)
    assert "No pretrained weights loaded" not in default.stderr  # open_clip's note, raw on the terminal before
    assert "WARNING root: No pretrained weights loaded" in info.stderr and "INFO root:" in info.stderr
    assert "LABELING WITH RANDOM WEIGHTS" in default.stderr  # CLASP's own warning stays visible
    assert_user_error(clasp("--log-level", "loud", "config", "ingest"), "log level 'loud'", "debug, info")


def test_defaults_named_in_help_are_the_config_defaults() -> None:
    import typer

    from pipeline import cli

    group = typer.main.get_command(cli.app)
    checked = 0
    for name, target in cli.COMMAND_CONFIGS.items():
        module, cls_name = target.split(":")
        defaults = to_plain(getattr(importlib.import_module(module), cls_name)())
        for param in group.commands[name].params:
            said = re.search(r"\(default:? ([^)]+)\)", getattr(param, "help", None) or "")
            key = param.name if param.name in defaults else {"fmt": "format"}.get(param.name)
            if not said or key not in defaults or defaults[key] is None or said.group(1).startswith(("2w", "PA-")):
                continue  # a described default: "the latest complete one", "2w x w of the CLIP's size"
            value = str(defaults[key])
            shown = {value, Path(value).relative_to(REPO).as_posix() if Path(value).is_absolute() else value}
            assert said.group(1) in shown, (name, key, said.group(1), value)
            checked += 1
    assert checked >= 15


def to_plain(cfg: object) -> dict:
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def test_an_output_folder_that_is_a_file_is_refused(labelled: tuple[Path, str], tmp_path: Path) -> None:
    taken = tmp_path / "notes.txt"
    taken.write_text("my notes")
    pretrain_run, synth_run = clasp_all(
        ["pretrain", *pretrain_overrides(labelled[0], taken)], ["synth", "--out", str(taken), "-n", "2"]
    )
    for done in (pretrain_run, synth_run):  # pretrain: a 40-line FileExistsError before
        assert_user_error(done, f"output folder {taken} is a file")
    assert taken.read_text() == "my notes"
