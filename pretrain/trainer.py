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
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline import formats, guards
from pipeline.config import save_config, to_dict
from pipeline.errors import ClaspError
from pretrain.config import PretrainConfig
from pretrain.data import build_stream, derive_seed, to_model_batch
from pretrain.meta_arch import LOSS_TERMS, ClaspMetaArch
from pretrain.resume import RunIdentity, plan_resume, saved_identity
from pretrain.schedules import build_schedules

CHECKPOINT_DIR = "checkpoints"
_CKPT_RE = re.compile(r"^step-(\d+)\.pt$")
#: a loss term that is exactly 0 for this many consecutive steps (no valid target: e.g. every part cell
#: under model.loss.part_conf_threshold) is reported once; checked at log intervals
ZERO_LOSS_WARN_STEPS = 20

log = logging.getLogger(__name__)


class NonFiniteLossError(ClaspError):
    """The loss became NaN/inf; training stopped before the optimizer could apply it."""


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


# --- checkpoints ------------------------------------------------------------------------------


def checkpoint_path(out: str | Path, step: int) -> Path:
    return Path(out) / CHECKPOINT_DIR / f"step-{step:09d}.pt"


def list_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary files of interrupted writes are ignored)."""
    folder = Path(out) / CHECKPOINT_DIR
    found = [(int(m.group(1)), p) for p in folder.glob("step-*.pt") if (m := _CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(cfg: PretrainConfig) -> Path | None:
    """The checkpoint to resume from: ``latest`` (None if the run has none), ``none``, or a path."""
    existing = list_checkpoints(cfg.out)
    if cfg.resume == "latest":
        return existing[-1] if existing else None
    if cfg.resume == "none":
        if existing:
            raise ClaspError(
                f"{cfg.out} already has checkpoints (newest {existing[-1].name}) and resume=none: "
                "use resume=latest to continue that run, or choose a fresh out=DIR"
            )
        return None
    path = Path(cfg.resume)
    if not path.is_file():
        raise ClaspError(f"resume={cfg.resume}: no such checkpoint file (use latest, none, or a step-*.pt path)")
    return path


def _model_changes(state: dict[str, Any], cfg: PretrainConfig) -> str:
    """The model settings that differ between a checkpoint's config and ``cfg``: "model.arch vit_micro -> vit_tiny"."""
    old, new = _flat(state.get("config", {}).get("model", {}), "model."), _flat(to_dict(cfg.model), "model.")
    return ", ".join(
        f"{k} {old.get(k)} -> {new.get(k)}" for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)
    )


def _flat(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def save_checkpoint(path: Path, state: dict[str, Any], keep_last: int) -> None:
    """Write ``state`` atomically, then delete all but the newest ``keep_last`` step checkpoints."""
    with formats.atomic_path(path) as tmp:
        torch.save(state, tmp)
    if keep_last > 0:
        for old in list_checkpoints(path.parent.parent)[:-keep_last]:
            old.unlink(missing_ok=True)


def _checkpoint_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Size of one checkpoint: the model state plus AdamW's two moments of every trained parameter."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trained = sum(p.numel() * 4 for group in optimizer.param_groups for p in group["params"] if p.requires_grad)
    return state + 2 * trained


def _forget_after(out: Path, step: int) -> None:
    """Undo what a killed run left past its last checkpoint: temporary checkpoint files and log rows after ``step``.

    The resumed run recomputes those steps exactly, so keeping their rows would count them twice.
    """
    for stale in (out / CHECKPOINT_DIR).glob("*.tmp-*"):
        stale.unlink(missing_ok=True)
    log_path = out / "log.jsonl"
    if not log_path.is_file():
        return
    lines = log_path.read_text().splitlines()
    kept = [line for line in lines if _log_step(line) <= step]
    if len(kept) != len(lines):
        with formats.atomic_path(log_path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))


def _log_step(line: str) -> float:
    """Step of a log.jsonl row; a row torn by a kill counts as past every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


# --- logging ----------------------------------------------------------------------------------


def _flat_hparams(cfg: PretrainConfig) -> dict[str, Any]:
    """Scalars only (TensorBoard hparams): nested keys dotted, lists and None as strings."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            key = prefix[:-1]
            flat[key] = value if isinstance(value, int | float | str | bool) else str(value)

    walk("", to_dict(cfg))
    return flat


def _moe_log(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """Router statistics as log values.

    Per prompt that routed tokens since the last log (student forwards, all MoE blocks together):
    ``moe/<prompt>/expert_share/<i>`` (share of its token-expert assignments that went to expert i) and
    ``moe/<prompt>/dropped_frac``. Per MoE block: the least-used expert's share (1/E = balanced) and the
    dropped share.
    """
    out = {}
    for name, value in stats.items():
        if name.startswith("prompt."):
            prompt, what = name.removeprefix("prompt.").rsplit(".", 1)
            if what != "tokens_per_expert":
                continue
            dropped = stats[f"prompt.{prompt}.dropped"]
            total = value.sum() + dropped
            if int(total) == 0:
                continue
            for i, count in enumerate((value.float() / total).tolist()):
                out[f"moe/{prompt}/expert_share/{i}"] = count
            out[f"moe/{prompt}/dropped_frac"] = float(dropped / total)
        elif name.endswith("tokens_per_expert"):
            share = value.float() / value.sum().clamp_min(1)
            out[f"moe/{name.removesuffix('.tokens_per_expert')}.min_expert_share"] = float(share.min())
        else:
            out[f"moe/{name}"] = float(value)
    return out


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


class _LossWatch:
    """Device-side record of non-finite and all-zero loss terms, read on the host only when asked."""

    def __init__(self, device: torch.device, watched: list[bool]) -> None:
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_terms = torch.zeros(len(LOSS_TERMS), device=device)
        self.zero_run = torch.zeros(len(LOSS_TERMS), dtype=torch.long, device=device)
        self.watched = watched  # terms that are switched on (a switched-off term is 0 by design)
        self.warned: set[str] = set()

    def update(self, step: int, terms: torch.Tensor) -> None:
        first = (self.bad_step < 0) & ~torch.isfinite(terms).all()
        self.bad_step = torch.where(first, step, self.bad_step)
        self.bad_terms = torch.where(first, terms, self.bad_terms)
        self.zero_run = (self.zero_run + 1) * (terms == 0)

    def check(self, last_ckpt: Path | None) -> None:
        bad = int(self.bad_step)
        if bad >= 0:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in zip(LOSS_TERMS, self.bad_terms.tolist(), strict=True))
            raise NonFiniteLossError(
                f"non-finite loss at step {bad} ({shown}); training stopped and nothing after it was saved. "
                f"Last good checkpoint: {last_ckpt or 'none (no checkpoint written yet)'}. "
                "Resume from it with a lower optim.lr, bf16 instead of fp16, or a smaller optim.clip_grad."
            )

    def zero_terms(self) -> list[str]:
        """Switched-on terms that have been exactly 0 for ``ZERO_LOSS_WARN_STEPS`` steps, each reported once."""
        runs = self.zero_run.tolist()
        found = [
            k
            for k, run, on in zip(LOSS_TERMS, runs, self.watched, strict=True)
            if on and run >= ZERO_LOSS_WARN_STEPS and k not in self.warned
        ]
        self.warned.update(found)
        return found


# --- the loop ---------------------------------------------------------------------------------


def train(cfg: PretrainConfig) -> RunSummary:
    """Pre-train (or resume) the CLASP model described by ``cfg``; returns a summary of the run."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from tqdm.auto import tqdm

    trackers = (["tensorboard"] if cfg.tensorboard else []) + (["wandb"] if cfg.wandb else [])
    if cfg.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ClaspError(
                "wandb=true but wandb is not installed: pip install 'clasp[wandb]' or set wandb=false"
            ) from None
    if cfg.mixed_precision is True:
        raise ClaspError("mixed_precision must be no, bf16 or fp16 (got true)")
    cfg.mixed_precision = cfg.mixed_precision or "no"
    device = guards.resolve_device("cpu" if cfg.cpu else "auto")
    if cfg.mixed_precision == "fp16" and device == "cpu":
        raise ClaspError(
            "mixed_precision=fp16 needs a CUDA GPU and none is in use here: use mixed_precision=bf16 or no on the CPU"
        )
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        # without a GPU, Accelerate only forms a multi-process (gloo) group when told it runs on the CPU
        cpu=device == "cpu",
        log_with=trackers or None,
        project_dir=cfg.out,
        # every trained parameter gets a gradient each step: all experts' weights enter the grouped (or
        # slotted) matmul even when an expert receives no token, switched-off heads are never built, and
        # the teacher is not trained; so DDP needs no unused-parameter search (an extra graph walk per step)
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != world:
        raise ClaspError(
            f"the launcher started {launched} processes but Accelerate formed a group of {world}: every process "
            "would train on the same data. Check the accelerate launch flags (--multi_gpu / --num_processes)"
        )
    main = accelerator.is_main_process
    set_seed(cfg.seed + rank)
    resume_from = resolve_resume(cfg)
    resumed = torch.load(resume_from, map_location="cpu", weights_only=True) if resume_from is not None else None
    if resumed is not None and cfg.data.labelset is None:
        cfg.data.labelset = saved_identity(resumed).labelset  # pinned: not the newest label set of today

    # ---- data
    stream = build_stream(
        cfg.data, global_hw=tuple(cfg.model.img_size), patch_size=cfg.model.patch_size, seed=cfg.seed,
        rank=rank, world_size=world, clip_embed=cfg.model.loss.distill,
    )  # fmt: skip
    labels = stream.labelset
    cfg.data.labelset = labels.labelset  # the resolved config names the label set actually used
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
    identity = RunIdentity(labels.labelset, stream.num_images, world, global_batch, steps_per_epoch)
    step, checkpoint_step, changes, previous_config = 0, 0, (), None
    if resumed is not None:
        plan = plan_resume(
            checkpoint=str(resume_from), step=int(resumed["step"]), saved=saved_identity(resumed),
            saved_config=resumed.get("config", {}), now=identity, now_config=to_dict(cfg),
            accept=set(cfg.resume_accept),
        )  # fmt: skip
        step, checkpoint_step = plan.step, int(resumed["step"])
        changes, previous_config = plan.changes, resumed.get("config")
        identity = RunIdentity(**{**identity.to_dict(), "stream_origin": plan.stream_origin})
    schedules = build_schedules(cfg.optim, cfg.model.loss, steps_per_epoch=steps_per_epoch, global_batch=global_batch)
    last_step = min(schedules.total_steps, cfg.max_steps) if cfg.max_steps else schedules.total_steps

    # ---- model, optimizer, resume
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
            changes = _model_changes(resumed, cfg) or str(exc).splitlines()[0][:80]
            raise ClaspError(
                f"{resume_from} holds another model than this config ({changes}): rerun with a new out=FOLDER, "
                "or resume=none to start over in this one"
            ) from None
        optimizer.load_state_dict(resumed["optimizer"])
    model, optimizer = accelerator.prepare(model, optimizer)
    if resumed is not None and resumed.get("scaler") is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(resumed["scaler"])
    del resumed
    core: ClaspMetaArch = accelerator.unwrap_model(model)
    out = Path(cfg.out)
    every = cfg.checkpoint_every
    new_checkpoints = last_step // every - step // every + (last_step % every != 0)
    copies = min(new_checkpoints, cfg.keep_last + 1) if cfg.keep_last > 0 else new_checkpoints  # kept + one in writing
    # every process checks (same shared disk), so a refusal stops all of them rather than leaving peers waiting
    guards.ensure_free_space(out, copies * _checkpoint_bytes(core, optimizer), what="pre-training checkpoints")
    if main:
        _forget_after(out, checkpoint_step)
        if changes and previous_config is not None:  # the run's settings until now stay on record
            with formats.atomic_path(out / f"config.before-step-{step:09d}.yaml") as tmp:
                tmp.write_text(yaml.safe_dump(previous_config, sort_keys=False))
        save_config(cfg, out / "config.yaml")
        if trackers:
            accelerator.init_trackers("pretrain", config=_flat_hparams(cfg))
        if not cfg.quiet:
            accelerator.print(
                f"pretrain: {stream.num_images} images in {stream.num_shards} shards, label set {labels.labelset}; "
                f"{world} process(es), global batch {global_batch}, {steps_per_epoch} steps/epoch, "
                f"steps {step}->{last_step}, peak lr {schedules.lr.max():.3g}"
                + (f" (= {cfg.optim.lr:g} x {global_batch}/256)" if cfg.optim.scale_lr_with_batch else "")
                + (f" (resumed from {resume_from})" if resume_from else "")
            )
            for change in changes:
                accelerator.print(f"pretrain: resume accepted a change: {change}")
    last_ckpt = resume_from

    def checkpoint_state() -> dict[str, Any]:
        return {
            "model": core.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "step": step,
            "config": to_dict(cfg),
            "data": {
                "corpus": cfg.data.corpus,
                "labelset": labels.labelset,
                "images": stream.num_images,
                "clip": labels.clip,
            },  # the CLIP of the labels: `clasp zeroshot` needs its text tower
            "world_size": world,
            "identity": identity.to_dict(),
        }

    # ---- train
    model.train()
    progress = tqdm(
        total=last_step, initial=step, unit="step", disable=cfg.quiet or not main, dynamic_ncols=True, desc="pretrain"
    )
    log_file = (out / "log.jsonl").open("a") if main else None
    origin_step, origin_epoch = identity.stream_origin
    batches = stream.batches(start_batch=(step - origin_step) * cfg.grad_accum, first_epoch=origin_epoch)
    t_first, step_first, t_log, step_log = None, step, time.perf_counter(), step
    terms_now: dict[str, float] = {}
    on = {"dino": loss_cfg.dino, "part": loss_cfg.part, "attribute": loss_cfg.attribute}
    watch = _LossWatch(accelerator.device, [on.get(k, False) for k in LOSS_TERMS])
    try:
        while step < last_step:
            torch.manual_seed(derive_seed(cfg.seed, rank, step))  # model randomness depends only on the step
            values = schedules.at(step)
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
            watch.update(step + 1, terms_mean)  # no host sync: read at log intervals and checkpoints
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
            step += 1
            progress.update(1)
            if t_first is None:
                t_first, step_first = time.perf_counter(), step

            if step % cfg.log_every == 0 or step == last_step:
                watch.check(last_ckpt)
                for term in watch.zero_terms():
                    if main:
                        log.warning(
                            "loss/%s has been exactly 0 for %d steps (up to step %d): it has no valid targets and "
                            "teaches nothing. For part: check the label set's part confidences (clasp audit) "
                            "against model.loss.part_conf_threshold",
                            term, ZERO_LOSS_WARN_STEPS, step,
                        )  # fmt: skip
                now = time.perf_counter()
                images_per_s = (step - step_log) * global_batch / max(now - t_log, 1e-9)
                t_log, step_log = now, step
                terms_now = dict(zip(LOSS_TERMS, terms_mean.tolist(), strict=True))
                row = {f"loss/{k}": v for k, v in terms_now.items()}
                row.update({f"sched/{k}": v for k, v in values.items()})
                row["images_per_s"] = images_per_s
                if grad_norm is not None:
                    row["grad_norm"] = float(grad_norm)
                row.update(_moe_log(core.moe_stats()))
                if main:
                    accelerator.log(row, step=step)
                    log_file.write(json.dumps({"step": step, **row}) + "\n")
                    log_file.flush()
                    progress.set_postfix(loss=f"{terms_now['total']:.4f}", img_s=f"{images_per_s:.0f}")

            if step % cfg.checkpoint_every == 0 or step == last_step:
                watch.check(last_ckpt)  # never save a model that took a non-finite step
                path = checkpoint_path(out, step)
                if main:
                    save_checkpoint(path, checkpoint_state(), cfg.keep_last)
                accelerator.wait_for_everyone()
                last_ckpt = path
    finally:
        progress.close()
        if log_file is not None:
            log_file.close()
        if trackers and main:
            accelerator.end_training()

    elapsed = time.perf_counter() - t_first if t_first is not None else 0.0
    images_per_s = (step - step_first) * global_batch / elapsed if elapsed > 0 and step > step_first else math.nan
    return RunSummary(
        step=step,
        total_steps=schedules.total_steps,
        steps_per_epoch=steps_per_epoch,
        global_batch=global_batch,
        checkpoint=last_ckpt,
        images_per_s=images_per_s,
        last_terms=terms_now,
    )


def export_run(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """``clasp export``: the teacher backbone of a checkpoint (or of a run directory's latest one) as a release."""
    from pretrain.export import export_backbone

    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        found = list_checkpoints(checkpoint)
        if not found:
            raise ClaspError(
                f"{checkpoint} has no {CHECKPOINT_DIR}/step-*.pt: pass a checkpoint file or a run directory"
            )
        checkpoint = found[-1]
    if not checkpoint.is_file():
        raise ClaspError(f"checkpoint {checkpoint} does not exist")
    # mmap: the card facts are tiny, the tensors need not be read here
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise ClaspError(
            f"{checkpoint} is not a pre-training checkpoint (torch.load: {type(exc).__name__}): give a run folder "
            f"or one of its {CHECKPOINT_DIR}/step-*.pt files"
        ) from None
    if not isinstance(state, dict) or not {"model", "config"} <= state.keys():
        raise ClaspError(f"{checkpoint} is not a pre-training checkpoint (no model/config): give a run folder")
    data = state.get("data") or {}
    card = {
        "corpus": data.get("corpus", "unknown"),
        "labelset_id": data.get("labelset", "unknown"),
        "corpus_images": data.get("images", "unknown"),
        "optimizer_steps": state.get("step", "unknown"),
        "processes": state.get("world_size", "unknown"),
        "checkpoint": str(checkpoint),
    }
    del state
    return export_backbone(checkpoint, Path(out_dir), card=card)
