"""``clasp pretrain``: the CLASP pre-training loop on Accelerate (any number of processes and machines).

Launch (every process runs the same command; Accelerate/torchrun set the rank)::

    clasp pretrain --config configs/pretrain/demo.yaml                      # one process (CPU or GPU)
    accelerate launch --multi_gpu --num_processes 8 -m pipeline.cli pretrain \\
        --config configs/pretrain/vit_b_luperson.yaml [key=value ...]
    # 2 machines x 8 GPUs: the same on each machine with
    #   --num_machines 2 --machine_rank {0,1} --main_process_ip HOST0 --main_process_port 29500 --num_processes 16
    # precision comes from the config (mixed_precision: bf16), not from launcher flags; without a GPU,
    # `--multi_gpu --num_processes 2` runs two CPU processes (gloo)

What the loop guarantees:

* seed + rank: model randomness (drop path) is re-seeded from (seed, rank, step) at every step, and
  the data stream's order and crops depend only on (seed, epoch, reader, position); a run resumed
  from a checkpoint starts the stream at the batches it had consumed and therefore takes exactly the
  steps the uninterrupted run took (``pretrain.data``).
* the checkpoint pins the run's identity (label set, images, world size, global batch, steps per
  epoch) and config; a resume that differs is refused unless ``resume_accept`` names the change
  (``pretrain.resume``); ``data.labelset: null`` resumes with the pinned label set.
* loss terms are all-reduced before they are checked and logged; a non-finite loss stops every
  process at the next log interval or checkpoint, whichever comes first (checked on the device every
  step, read on the host only there, so the hot loop has no host sync), naming the first bad step, its
  terms and the last good checkpoint; no checkpoint is written after a bad step.
* a loss term that stays exactly zero (no valid targets) for ``ZERO_LOSS_WARN_STEPS`` steps is warned
  about once.
* only the main process logs (TensorBoard, optional wandb, ``log.jsonl``, progress bar) and saves.
* a resumed run first removes what a killed run left past its checkpoint (temporary checkpoint
  files, ``log.jsonl`` rows of later steps): those steps are recomputed and logged once. Before any
  write, the disk must hold the checkpoints still to come (``pipeline.guards``).
* checkpoints (``out/checkpoints/step-NNNNNNNNN.pt``) are written atomically and hold
  ``model`` (``ClaspMetaArch`` state: student, EMA teacher, DINO centre), ``optimizer``, ``scaler``,
  ``step``, ``config`` (the resolved config as a dict), ``data`` (corpus, label set, image count) and
  ``identity`` (``pretrain.resume.RunIdentity``),
  the layout ``pretrain.export.export_backbone`` reads. Checkpoints are read back by every process,
  so with several machines ``out`` must be on a shared filesystem.

Where things are: ``train`` below is the loop (setup, then step / log / checkpoint); the setup steps are in
``pretrain.run_setup``, checkpoint files in ``pretrain.checkpoints``, loss checks and log values in
``pretrain.train_log``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from pipeline.config import to_dict
from pretrain.checkpoints import (
    CHECKPOINT_DIR,
    checkpoint_path,
    export_run,
    list_checkpoints,
    resolve_resume,
    save_checkpoint,
)
from pretrain.config import PretrainConfig
from pretrain.data import derive_seed, to_model_batch
from pretrain.meta_arch import LOSS_TERMS, ClaspMetaArch
from pretrain.run_setup import RunPlan, build_model, make_accelerator, plan_run, prepare_out, trackers
from pretrain.train_log import LossWatch, NonFiniteLossError, moe_log

# what callers import from here (the checkpoint helpers live in pretrain.checkpoints)
__all__ = [
    "CHECKPOINT_DIR", "NonFiniteLossError", "RunSummary", "checkpoint_path", "clip_grads_per_param", "export_run",
    "list_checkpoints", "resolve_resume", "save_checkpoint", "train",
]  # fmt: skip

#: a loss term that is exactly 0 for this many consecutive steps (no valid target: e.g. every part cell
#: under model.loss.part_conf_threshold) is reported once; checked at log intervals
ZERO_LOSS_WARN_STEPS = 20

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What a finished (or stopped-early) run reports."""

    step: int
    total_steps: int
    steps_per_epoch: int
    global_batch: int
    checkpoint: Path | None
    images_per_s: float  # after the first step (excludes start-up and compilation of kernels)
    last_terms: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def clip_grads_per_param(parameters: Any, max_norm: float) -> torch.Tensor:
    """Scale each parameter's gradient to norm <= ``max_norm`` on its own (DINO's ``clip_gradients``).

    No host sync (foreach kernels, the scale is a device tensor). Returns the global norm before clipping.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    torch._foreach_mul_(grads, [(max_norm / (n + 1e-6)).clamp(max=1.0) for n in norms])
    return torch.linalg.vector_norm(torch.stack(norms))


# --- one step, its log row, its checkpoint ----------------------------------------------------


@dataclass
class _Loop:
    """What the steps of one run share; the step counter itself lives in ``train``."""

    cfg: PretrainConfig
    plan: RunPlan
    accelerator: Any
    model: torch.nn.Module  # as prepared by Accelerate (DDP-wrapped with several processes)
    core: ClaspMetaArch  # the same model unwrapped
    optimizer: torch.optim.Optimizer
    watch: LossWatch
    progress: Any
    log_file: IO[str] | None  # log.jsonl, open on the main process only
    t_log: float = 0.0  # time and step of the previous log row (throughput since then)
    step_log: int = 0


def _train_step(
    run: _Loop, batches: Any, step: int, values: dict[str, float]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step over ``grad_accum`` micro-batches; returns the all-reduced loss terms and the grad norm."""
    cfg, accelerator, model, core, optimizer = run.cfg, run.accelerator, run.model, run.core, run.optimizer
    torch.manual_seed(derive_seed(cfg.seed, accelerator.process_index, step))  # model randomness: only the step
    for group in optimizer.param_groups:
        group["lr"] = values["lr"]
        group["weight_decay"] = values["weight_decay"] * group.get("wd_multiplier", 1.0)

    terms_sum = torch.zeros(len(LOSS_TERMS), device=accelerator.device)
    for micro in range(cfg.grad_accum):
        batch = to_model_batch(next(batches), accelerator.device, cfg.data.mean, cfg.data.std)
        sync = micro == cfg.grad_accum - 1
        with nullcontext() if sync else accelerator.no_sync(model):
            loss, terms = model(batch, teacher_temp=values["teacher_temp"])
            accelerator.backward(loss / cfg.grad_accum)
        terms_sum += torch.stack([terms[k].float() for k in LOSS_TERMS])
    terms_mean = accelerator.reduce(terms_sum / cfg.grad_accum, reduction="mean")
    run.watch.update(step + 1, terms_mean)  # no host sync: read at log intervals and checkpoints
    # DINO: the frozen last layer's gradient is cancelled before clipping, so it takes no part in it
    core.cancel_last_layer_grads(step)
    grad_norm = None
    if cfg.optim.clip_grad > 0 and cfg.optim.clip_mode == "global":
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
    elif cfg.optim.clip_grad > 0:
        accelerator.unscale_gradients()  # fp16: clip the true gradients (no-op otherwise)
        grad_norm = clip_grads_per_param(model.parameters(), cfg.optim.clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    core.update_teacher(values["momentum"])
    return terms_mean, grad_norm


def _log_row(
    run: _Loop,
    step: int,
    values: dict[str, float],
    terms_mean: torch.Tensor,
    grad_norm: torch.Tensor | None,
    last_ckpt: Path | None,
) -> dict[str, float]:
    """Check the loss (stops a non-finite run), warn about dead terms, log one row; returns the loss terms."""
    main = run.accelerator.is_main_process
    run.watch.check(last_ckpt)
    for term in run.watch.zero_terms():
        if main:
            log.warning(
                "loss/%s has been exactly 0 for %d steps (up to step %d): it has no valid targets and "
                "teaches nothing. For part: check the label set's part confidences (clasp audit) "
                "against model.loss.part_conf_threshold",
                term, run.watch.zero_warn_steps, step,
            )  # fmt: skip
    now = time.perf_counter()
    images_per_s = (step - run.step_log) * run.plan.global_batch / max(now - run.t_log, 1e-9)
    run.t_log, run.step_log = now, step
    terms_now = dict(zip(LOSS_TERMS, terms_mean.tolist(), strict=True))
    row = {f"loss/{k}": v for k, v in terms_now.items()}
    row.update({f"sched/{k}": v for k, v in values.items()})
    row["images_per_s"] = images_per_s
    if grad_norm is not None:
        row["grad_norm"] = float(grad_norm)
    row.update(moe_log(run.core.moe_stats()))
    if main:
        run.accelerator.log(row, step=step)
        run.log_file.write(json.dumps({"step": step, **row}) + "\n")
        run.log_file.flush()
        run.progress.set_postfix(loss=f"{terms_now['total']:.4f}", img_s=f"{images_per_s:.0f}")
    return terms_now


def _checkpoint(run: _Loop, step: int, last_ckpt: Path | None) -> Path:
    """Save step ``step`` (main process; never after a non-finite step); every process waits for it."""
    run.watch.check(last_ckpt)  # never save a model that took a non-finite step
    path = checkpoint_path(run.cfg.out, step)
    if run.accelerator.is_main_process:
        cfg, accelerator, stream = run.cfg, run.accelerator, run.plan.stream
        state = {
            "model": run.core.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "step": step,
            "config": to_dict(cfg),
            "data": {
                "corpus": cfg.data.corpus,
                "labelset": stream.labelset.labelset,
                "images": stream.num_images,
                "clip": stream.labelset.clip,
            },  # the CLIP of the labels: `clasp zeroshot` needs its text tower
            "world_size": accelerator.num_processes,
            "identity": run.plan.identity.to_dict(),
        }
        save_checkpoint(path, state, cfg.keep_last)
    run.accelerator.wait_for_everyone()
    return path


# --- the loop ---------------------------------------------------------------------------------


def train(cfg: PretrainConfig) -> RunSummary:
    """Pre-train (or resume) the CLASP model described by ``cfg``; returns a summary of the run.

    ``cfg`` is left as it is: the values resolved at start (label set, steps per epoch, frozen steps)
    go into a copy, which is what ``out/config.yaml`` and the checkpoints record.
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    # ---- setup and resume
    cfg = copy.deepcopy(cfg)
    accelerator = make_accelerator(cfg)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    set_seed(cfg.seed + rank)
    resume_from = resolve_resume(cfg)
    resumed = torch.load(resume_from, map_location="cpu", weights_only=True) if resume_from is not None else None
    plan = plan_run(cfg, resumed, resume_from, rank=rank, world=world)
    model, optimizer, core = build_model(cfg, plan, resumed, accelerator)
    del resumed
    prepare_out(cfg, plan, accelerator, core, optimizer)

    # ---- train
    step, last_step = plan.step, plan.last_step
    model.train()
    loss_cfg = cfg.model.loss
    on = {"dino": loss_cfg.dino, "part": loss_cfg.part, "attribute": loss_cfg.attribute}
    run = _Loop(
        cfg, plan, accelerator, model, core, optimizer,
        watch=LossWatch(accelerator.device, [on.get(k, False) for k in LOSS_TERMS],
                        zero_warn_steps=ZERO_LOSS_WARN_STEPS),
        progress=tqdm(total=last_step, initial=step, unit="step", disable=cfg.quiet or not main, dynamic_ncols=True,
                      desc="pretrain"),
        log_file=(Path(cfg.out) / "log.jsonl").open("a") if main else None,
        t_log=time.perf_counter(), step_log=step,
    )  # fmt: skip
    origin_step, origin_epoch = plan.identity.stream_origin
    batches = plan.stream.batches(start_batch=(step - origin_step) * cfg.grad_accum, first_epoch=origin_epoch)
    t_first, step_first, last_ckpt = None, step, plan.resume_from
    terms_now: dict[str, float] = {}
    try:
        while step < last_step:
            values = plan.schedules.at(step)
            terms_mean, grad_norm = _train_step(run, batches, step, values)
            step += 1
            run.progress.update(1)
            if t_first is None:
                t_first, step_first = time.perf_counter(), step
            if step % cfg.log_every == 0 or step == last_step:
                terms_now = _log_row(run, step, values, terms_mean, grad_norm, last_ckpt)
            if step % cfg.checkpoint_every == 0 or step == last_step:
                last_ckpt = _checkpoint(run, step, last_ckpt)
    finally:
        run.progress.close()
        if run.log_file is not None:
            run.log_file.close()
        if trackers(cfg) and main:
            accelerator.end_training()

    elapsed = time.perf_counter() - t_first if t_first is not None else 0.0
    images_per_s = (step - step_first) * plan.global_batch / elapsed if elapsed > 0 and step > step_first else math.nan
    return RunSummary(
        step=step,
        total_steps=plan.schedules.total_steps,
        steps_per_epoch=plan.steps_per_epoch,
        global_batch=plan.global_batch,
        checkpoint=last_ckpt,
        images_per_s=images_per_s,
        last_terms=terms_now,
    )
