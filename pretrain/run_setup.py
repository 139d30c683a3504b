"""Setting up a pre-training run: the Accelerator, the run plan (stream, identity, schedules, resume), the model.

``pretrain.trainer.train`` calls these once, in this order, before its loop; each resolves what it
derives into the run's own copy of the config, so ``out/config.yaml`` records the values used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline import formats, guards
from pipeline.config import save_config, to_dict
from pipeline.errors import ClaspError
from pretrain.checkpoints import checkpoint_bytes, forget_after, model_changes
from pretrain.config import PretrainConfig
from pretrain.data import PretrainStream, build_stream
from pretrain.meta_arch import ClaspMetaArch
from pretrain.resume import RunIdentity, plan_resume, saved_identity
from pretrain.schedules import Schedules, build_schedules
from pretrain.train_log import flat_hparams


def trackers(cfg: PretrainConfig) -> list[str]:
    return (["tensorboard"] if cfg.tensorboard else []) + (["wandb"] if cfg.wandb else [])


def make_accelerator(cfg: PretrainConfig) -> Any:
    """The Accelerator of this process (device, precision, process group, trackers); normalises cfg.mixed_precision."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if cfg.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ClaspError(
                "wandb=true but wandb is not installed: pip install 'clasp[wandb]' or set wandb=false"
            ) from None
    device = guards.resolve_device("cpu" if cfg.cpu else "auto")
    if cfg.mixed_precision == "fp16" and device == "cpu":
        raise ClaspError(
            "mixed_precision=fp16 needs a CUDA GPU and none is in use here: use mixed_precision=bf16 or no on the CPU"
        )
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        # without a GPU, Accelerate only forms a multi-process (gloo) group when told it runs on the CPU
        cpu=device == "cpu",
        log_with=trackers(cfg) or None,
        project_dir=cfg.out,
        # every trained parameter gets a gradient each step: all experts' weights enter the grouped (or
        # slotted) matmul even when an expert receives no token, switched-off heads are never built, and
        # the teacher is not trained; so DDP needs no unused-parameter search (an extra graph walk per step)
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ClaspError(
            f"the launcher started {launched} processes but Accelerate formed a group of {accelerator.num_processes}: "
            "every process would train on the same data. Check the accelerate launch flags (--multi_gpu / "
            "--num_processes)"
        )
    return accelerator


@dataclass
class RunPlan:
    """The data stream, schedules and step range of this run, resolved once before the model is built."""

    stream: PretrainStream
    schedules: Schedules
    identity: RunIdentity
    global_batch: int
    steps_per_epoch: int
    step: int  # the first step this run takes
    last_step: int
    resume_from: Path | None = None
    checkpoint_step: int = 0  # step of the checkpoint resumed from (before any rescaling of the schedule)
    changes: tuple[str, ...] = ()  # accepted resume changes, "key: old -> new"
    previous_config: dict[str, Any] | None = None  # the checkpoint's config when changes were accepted


def plan_run(
    cfg: PretrainConfig, resumed: dict[str, Any] | None, resume_from: Path | None, *, rank: int, world: int
) -> RunPlan:
    """Open the stream and fix what the run's identity derives from it; resolves those values into ``cfg``."""
    if resumed is not None and cfg.data.labelset is None:
        cfg.data.labelset = saved_identity(resumed).labelset  # pinned: not the newest label set of today
    stream = build_stream(
        cfg.data, global_hw=tuple(cfg.model.img_size), patch_size=cfg.model.patch_size, seed=cfg.seed,
        rank=rank, world_size=world, clip_embed=cfg.model.loss.distill,
    )  # fmt: skip
    cfg.data.labelset = stream.labelset.labelset  # the resolved config names the label set actually used
    global_batch = cfg.data.batch_size * world * cfg.grad_accum
    if global_batch > stream.num_images:
        raise ClaspError(
            f"global batch {global_batch} (data.batch_size {cfg.data.batch_size} x {world} process(es) x grad_accum "
            f"{cfg.grad_accum}) is larger than corpus '{cfg.data.corpus}' ({stream.num_images} images): "
            "lower data.batch_size or grad_accum"
        )
    steps_per_epoch = cfg.data.steps_per_epoch or max(1, stream.num_images // global_batch)
    cfg.data.steps_per_epoch = steps_per_epoch
    loss_cfg = cfg.model.loss
    if loss_cfg.freeze_last_layer_epochs > 0:
        if loss_cfg.freeze_last_layer_steps > 0:
            raise ClaspError(
                "model.loss.freeze_last_layer_steps and model.loss.freeze_last_layer_epochs are both set: keep one"
            )
        # the resolved config records the steps this run actually froze the last layer for
        loss_cfg.freeze_last_layer_steps = round(loss_cfg.freeze_last_layer_epochs * steps_per_epoch)
        loss_cfg.freeze_last_layer_epochs = 0.0
    identity = RunIdentity(stream.labelset.labelset, stream.num_images, world, global_batch, steps_per_epoch)
    schedules = build_schedules(cfg.optim, loss_cfg, steps_per_epoch=steps_per_epoch, global_batch=global_batch)
    last_step = min(schedules.total_steps, cfg.max_steps) if cfg.max_steps else schedules.total_steps
    plan = RunPlan(stream, schedules, identity, global_batch, steps_per_epoch, 0, last_step, resume_from)
    if resumed is not None:
        resume = plan_resume(
            checkpoint=str(resume_from), step=int(resumed["step"]), saved=saved_identity(resumed),
            saved_config=resumed.get("config", {}), now=identity, now_config=to_dict(cfg),
            accept=set(cfg.resume_accept),
        )  # fmt: skip
        plan.step, plan.checkpoint_step = resume.step, int(resumed["step"])
        plan.changes, plan.previous_config = resume.changes, resumed.get("config")
        plan.identity = RunIdentity(**{**identity.to_dict(), "stream_origin": resume.stream_origin})
    return plan


def build_model(
    cfg: PretrainConfig, plan: RunPlan, resumed: dict[str, Any] | None, accelerator: Any
) -> tuple[torch.nn.Module, torch.optim.Optimizer, ClaspMetaArch]:
    """Model and AdamW (restored from ``resumed``), prepared by Accelerate; also returns the unwrapped model."""
    labels = plan.stream.labelset
    model = ClaspMetaArch(
        cfg.model, num_parts=len(labels.parts), num_attributes=len(labels.attributes),
        clip_embed_dim=labels.clip_embed_dim,
    )  # fmt: skip
    optimizer = torch.optim.AdamW(
        model.get_params_groups(cfg.optim.weight_decay),
        lr=0.0,
        betas=cfg.optim.betas,
        fused=accelerator.device.type == "cuda",  # one kernel for all parameters on the GPU
    )
    if resumed is not None:
        try:
            model.load_state_dict(resumed["model"], strict=True)
        except RuntimeError as exc:  # torch lists every mismatched tensor (100+ lines); name the settings instead
            changes = model_changes(resumed, cfg) or str(exc).splitlines()[0][:80]
            raise ClaspError(
                f"{plan.resume_from} holds another model than this config ({changes}): rerun with a new "
                "out=FOLDER, or resume=none to start over in this one"
            ) from None
        optimizer.load_state_dict(resumed["optimizer"])
    model, optimizer = accelerator.prepare(model, optimizer)
    if resumed is not None and resumed.get("scaler") is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(resumed["scaler"])
    return model, optimizer, accelerator.unwrap_model(model)


def prepare_out(
    cfg: PretrainConfig, plan: RunPlan, accelerator: Any, core: ClaspMetaArch, optimizer: torch.optim.Optimizer
) -> None:
    """Check the disk, drop what a killed run left, write the resolved config, start trackers, say what runs."""
    out, every, step, last_step = Path(cfg.out), cfg.checkpoint_every, plan.step, plan.last_step
    new_checkpoints = last_step // every - step // every + (last_step % every != 0)
    copies = min(new_checkpoints, cfg.keep_last + 1) if cfg.keep_last > 0 else new_checkpoints  # kept + one in writing
    # every process checks (same shared disk), so a refusal stops all of them rather than leaving peers waiting
    guards.ensure_free_space(out, copies * checkpoint_bytes(core, optimizer), what="pre-training checkpoints")
    if not accelerator.is_main_process:
        return
    forget_after(out, plan.checkpoint_step)
    if plan.changes and plan.previous_config is not None:  # the run's settings until now stay on record
        with formats.atomic_path(out / f"config.before-step-{step:09d}.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(plan.previous_config, sort_keys=False))
    save_config(cfg, out / "config.yaml")
    if trackers(cfg):
        accelerator.init_trackers("pretrain", config=flat_hparams(cfg))
    if not cfg.quiet:
        stream = plan.stream
        accelerator.print(
            f"pretrain: {stream.num_images} images in {stream.num_shards} shards, label set "
            f"{stream.labelset.labelset}; {accelerator.num_processes} process(es), global batch {plan.global_batch}, "
            f"{plan.steps_per_epoch} steps/epoch, steps {step}->{last_step}, peak lr {plan.schedules.lr.max():.3g}"
            + (f" (= {cfg.optim.lr:g} x {plan.global_batch}/256)" if cfg.optim.scale_lr_with_batch else "")
            + (f" (resumed from {plan.resume_from})" if plan.resume_from else "")
        )
        for change in plan.changes:
            accelerator.print(f"pretrain: resume accepted a change: {change}")
