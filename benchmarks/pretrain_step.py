"""Pre-training step cost: MoE vs plain ViT, and the full loop (label-joined stream) vs bare compute.

    .venv/bin/python -m benchmarks.pretrain_step                       # CPU-sized: ViT-Ti, batch 8
    python -m benchmarks.pretrain_step --arch vit_base --batch 128 --precision bf16 --workers 16 \\
        --steps 20 --warmup 5 --images 8192 --compile --skip-rss           # one GPU (benchmarks/gpu_all.sh)

Measured in one run, same model settings, same process:

* ``bare fwd+bwd``: forward + backward of ``ClaspMetaArch`` on one batch held on the device (no data
  loading, no optimizer), MoE on and off.
* ``bare step``: the same plus gradient clipping, AdamW and the EMA teacher update. MoE and dense models
  are timed in interleaved rounds (medians), so a shared machine's changing load affects both alike.
* ``loop``: ``pretrain.trainer.train`` streaming real WebDataset shards joined with Parquet label
  shards (written here: LUPerson-like JPEG sizes, blurred-noise content), multi-crop in DataLoader
  workers, logging every ``--warmup`` steps; timed over the intervals after the first one. Each of the
  ``--rounds`` loop runs is compared with bare fwd+bwd runs right before and after it (median ratio).
* ``loader``: the stream alone (batches/s without a model), and its peak RSS at two corpus sizes
  (fresh subprocesses; the RSS must not grow with the corpus); ``--skip-rss``: the small corpus only.
* ``--compile``: bare fwd+bwd and step again with ``torch.compile`` on the meta-arch, MoE and dense (eager loop).
* on CUDA, ``peak_mem_*_gib``: the largest ``torch.cuda.max_memory_allocated`` over a model's bare runs.
* ``distill``: the bare MoE step again with the CLIP-embedding distillation term on (``model.loss.distill``,
  a ``--clip-dim`` embedding per image in the label shards), interleaved with the same step without it.

Figures: ``distill_step_ratio`` = bare step images/s with distillation / without (target >= 0.95: the term
costs at most 5% of a step), ``distill_flops_ratio`` the same in counted FLOPs; ``moe_ratio`` = bare step images/s
with MoE / without (target >= 0.67); ``loop_ratio`` = loop images/s / bare fwd+bwd images/s with MoE (target >= 0.85);
on CUDA also ``mfu`` = counted FLOPs (torch FlopCounterMode, one training step incl. teacher) x images/s / peak bf16
FLOP/s, against the datasheet and against ``--peak-flops`` (the measured matrix-product rate, benchmarks/gpu_common.py)
when given. ``--budget-s`` skips loop rounds and compiled runs that would not fit; ``--out`` gets the figures after
every section (a run killed by a time guard keeps them). Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.gpu_common import Budget, Results, datasheet_peak, person_jpeg

REPO = Path(__file__).resolve().parent.parent

COMPILE_ALLOWANCE_S = 75  # budget kept free for torch.compile of one ViT-B meta-arch (fwd + bwd) before timing it


def write_corpus(root: Path, corpus: str, n_images: int, n_shards: int, seed: int = 0, clip_dim: int = 512) -> None:
    """Image shards (LUPerson-like JPEG sizes) + a complete label set with the default vocabularies and a
    ``clip_dim``-wide fp16 clip_embed per image (random unit vectors)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    from pipeline import formats
    from pipeline.vocab import load_attributes, load_parts

    attrs, parts = load_attributes().names, list(load_parts().names)
    grid = (16, 8)
    pool = [person_jpeg(seed * 1000 + i) for i in range(64)]  # 64 distinct encodings, reused with distinct keys
    img_dir, lab_dir = formats.images_dir(root, corpus), formats.labels_dir(root, corpus, "bench")
    img_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    schema = formats.label_schema(len(attrs), parts, with_embed=True)
    np_rng = np.random.default_rng(seed)
    sizes, per_shard = {}, math.ceil(n_images / n_shards)
    for s in range(n_shards):
        keys = [f"bench_{s:04d}_{i:05d}" for i in range(min(per_shard, n_images - s * per_shard))]
        tar = formats.image_shard_path(root, corpus, s)
        with wds.TarWriter(str(tar)) as sink:
            for i, key in enumerate(keys):
                data, w, h = pool[(s * per_shard + i) % len(pool)]
                sink.write({"__key__": key, "jpg": data, "json": {"width": w, "height": h, "source": key}})
        sizes[tar.name] = len(keys)
        n, cells = len(keys), grid[0] * grid[1]
        columns = {
            "key": keys,
            "attr_prob": np_rng.integers(0, 256, (n, len(attrs)), dtype=np.uint8).tolist(),
            "part_map": [bytes(r) for r in np_rng.integers(0, len(parts), (n, cells), dtype=np.uint8)],
            "part_conf": [bytes(r) for r in np_rng.integers(0, 256, (n, cells), dtype=np.uint8)],
            "fg_ratio": [0.5] * n,
        }
        embed = np_rng.standard_normal((n, clip_dim)).astype(np.float32)
        embed /= np.linalg.norm(embed, axis=1, keepdims=True)
        columns["clip_embed"] = [r.astype("<f2").tobytes() for r in embed]
        for name in parts[1:]:
            columns[f"area_{name}"] = [0] * n
            columns[f"row_{name}"] = [None] * n
        pq.write_table(pa.table(columns, schema=schema), formats.label_shard_path(root, corpus, "bench", s))
    (img_dir / formats.SIZES_FILE).write_text(json.dumps(sizes))
    meta = {"labelset": "bench", "grid": list(grid), "attributes": {"names": attrs}, "parts": {"names": parts}}
    (lab_dir / formats.LABELSET_FILE).write_text(json.dumps(meta))


def make_config(args: argparse.Namespace, root: Path, corpus: str, *extra: str):
    from pipeline.config import load_config
    from pretrain.config import PretrainConfig

    data = [f"root={root}", f"corpus={corpus}", f"batch_size={args.batch}", f"workers={args.workers}"]
    data += [f"num_local_crops={args.local_crops}", "steps_per_epoch=1000000"]
    model = [f"arch={args.arch}", f"img_size=[{args.img[0]},{args.img[1]}]", f"patch_size={args.patch}"]
    model.append(f"loss.dino_out_dim={args.dino_out_dim}")
    run = [f"mixed_precision='{args.precision}'", "tensorboard=false", "quiet=true", "checkpoint_every=1000000000"]
    run += ["optim.epochs=1", "optim.warmup_epochs=0"]  # schedules are arrays over all steps: keep them 1e6 long
    overrides = [f"data.{o}" for o in data] + [f"model.{o}" for o in model] + run + ["resume=none", *extra]
    return load_config(PretrainConfig, overrides=overrides)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


class BareStep:
    """The meta-arch, its optimizer and one device-resident batch: the step without any data loading."""

    def __init__(self, cfg, batch_cpu: dict, n_parts: int, clip_dim: int = 0) -> None:
        import torch
        from accelerate import Accelerator

        from pretrain.data import to_model_batch
        from pretrain.meta_arch import ClaspMetaArch

        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
        num_attributes = batch_cpu["attr_prob"].shape[1]
        model = ClaspMetaArch(cfg.model, num_parts=n_parts, num_attributes=num_attributes, clip_embed_dim=clip_dim)
        fused = self.accelerator.device.type == "cuda"
        optimizer = torch.optim.AdamW(model.get_params_groups(0.04), lr=1e-5, fused=fused)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.core = self.accelerator.unwrap_model(self.model)
        self.batch = to_model_batch(batch_cpu, self.accelerator.device, cfg.data.mean, cfg.data.std)
        self.images = self.batch["global_crops"].shape[0]

    def fwd_bwd(self) -> None:
        loss, _ = self.model(self.batch, teacher_temp=0.07)
        self.accelerator.backward(loss)
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        from pretrain.trainer import clip_grads_per_param

        loss, _ = self.model(self.batch, teacher_temp=0.07)
        self.accelerator.backward(loss)
        self.core.cancel_last_layer_grads(0)
        clip_grads_per_param(self.model.parameters(), 3.0)  # as the trainer (optim.clip_mode=per_param)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.core.update_teacher(0.996)

    def compile(self, backend: str) -> None:
        """torch.compile the meta-arch (its forward and backward); optimizer and EMA update stay eager."""
        import torch

        self.model = torch.compile(self.model, backend=backend)

    def images_per_s(self, fn, steps: int, warmup: int) -> float:
        import torch

        on_gpu = self.accelerator.device.type == "cuda"
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            fn()
        sync(self.accelerator.device)
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(self.accelerator.device)
        rate = steps * self.images / (time.perf_counter() - t)
        if on_gpu:  # includes whatever else this process holds on the GPU (the other model's weights and state)
            self.peak_mem_bytes = max(getattr(self, "peak_mem_bytes", 0), torch.cuda.max_memory_allocated())
        return rate

    def flops_per_image(self) -> float:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            self.fwd_bwd()
        return counter.get_total_flops() / self.images


def interleaved(benches: dict[str, BareStep], rounds: int, steps: int, warmup: int) -> dict[str, list[float]]:
    """Rounds of (fwd+bwd, full step) for each model in turn, so a drifting machine load hits all alike."""
    rates: dict[str, list[float]] = {}
    for _ in range(rounds):
        for tag, bench in benches.items():
            rates.setdefault(f"fwd_bwd_{tag}", []).append(bench.images_per_s(bench.fwd_bwd, steps, warmup))
            rates.setdefault(f"step_{tag}", []).append(bench.images_per_s(bench.step, steps, warmup))
    return rates


def loop(cfg, out_dir: Path, steps: int, warmup: int) -> float:
    """Trainer images/s over the log intervals after the first (which holds start-up)."""
    from pretrain.trainer import train

    cfg.out = str(out_dir)
    cfg.max_steps = warmup + steps
    cfg.log_every = warmup
    summary = train(cfg)
    rows = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    # each row's images_per_s covers the steps since the previous row; the first interval holds start-up
    spans = [(r["step"] - prev["step"], r["images_per_s"]) for prev, r in zip(rows, rows[1:], strict=False)]
    images = sum(n for n, _ in spans) * summary.global_batch
    return images / sum(n * summary.global_batch / rate for n, rate in spans)


def peak_rss_mb(pid: int | str = "self") -> float:
    """Peak resident set (VmHWM) of a live process in MB; unlike ru_maxrss it does not inherit the parent's."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024


def loader_rss(root: Path, corpus: str, batches: int) -> dict[str, float]:
    """Stream ``batches`` batches in a fresh process: images/s, peak RSS of its main process and largest worker."""
    code = f"""
import json, sys, time
sys.argv = [""] + {sys.argv[1:]!r}
from benchmarks.pretrain_step import make_config, parse_args, peak_rss_mb
from pretrain.data import build_stream
args = parse_args()
cfg = make_config(args, __import__("pathlib").Path({str(root)!r}), {corpus!r})
stream = build_stream(cfg.data, global_hw=tuple(cfg.model.img_size), patch_size=cfg.model.patch_size, seed=0)
it = stream.batches()
next(it)
t = time.perf_counter()
for _ in range({batches}):
    next(it)
rate = {batches} * cfg.data.batch_size / (time.perf_counter() - t)
workers = [peak_rss_mb(w.pid) for w in getattr(it, "_workers", [])]
print(json.dumps({{"images_per_s": rate, "rss_main_mb": peak_rss_mb(), "rss_worker_mb": max(workers, default=0.0)}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="vit_tiny")
    p.add_argument("--img", type=int, nargs=2, default=[256, 128])
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--batch", type=int, default=8, help="images per step")
    p.add_argument("--local-crops", type=int, default=8)
    p.add_argument("--dino-out-dim", type=int, default=65536)
    p.add_argument("--clip-dim", type=int, default=512, help="stored CLIP embedding width (ViT-B/16: 512)")
    p.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3, help="interleaved MoE/dense measurement rounds")
    p.add_argument("--loop-rounds", type=int, default=None, help="trainer loop runs (default: --rounds)")
    p.add_argument("--images", type=int, default=512, help="images in the (small) benchmark corpus")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--loader-batches", type=int, default=6)
    p.add_argument("--skip-rss", action="store_true", help="loader figures on the small corpus only")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd bare fwd+bwd and step")
    p.add_argument("--compile-backend", default="inductor", help="'eager' checks the compile path cheaply")
    p.add_argument("--peak-flops", type=float, default=None, help="measured bf16 FLOP/s for a second MFU figure")
    p.add_argument("--budget-s", type=float, default=float("inf"), help="skip loop rounds / compiles that won't fit")
    p.add_argument("--out", default=None, help="JSON file rewritten after every section")
    return p.parse_args()


def bare_section(benches: dict[str, BareStep], args: argparse.Namespace, res: Results, kind: str, rounds: int) -> None:
    """Interleaved fwd+bwd and full-step rates of every model (``kind``: eager or compiled), medians."""
    rates = interleaved(benches, rounds, args.steps, args.warmup)
    sfx = "" if kind == "eager" else "_compiled"
    for name, values in rates.items():
        res.update(**{f"bare_{name}{sfx}_images_per_s": statistics.median(values)})
    for tag in benches:
        fb, st = res.data[f"bare_fwd_bwd_{tag}{sfx}_images_per_s"], res.data[f"bare_step_{tag}{sfx}_images_per_s"]
        print(f"bare {tag:5s} {kind:8s}: fwd+bwd {fb:.1f} img/s, full step {st:.1f} img/s (median of {rounds})")
    if kind == "eager":
        res.update(
            moe_ratio=statistics.median(m / d for m, d in zip(rates["step_moe"], rates["step_dense"], strict=True)),
            moe_ratio_fwd_bwd=statistics.median(
                m / d for m, d in zip(rates["fwd_bwd_moe"], rates["fwd_bwd_dense"], strict=True)
            ),
        )
        print(
            f"MoE / dense, full step: {res.data['moe_ratio']:.3f} (target >= 0.67); fwd+bwd: "
            f"{res.data['moe_ratio_fwd_bwd']:.3f}"
        )


def distill_section(
    moe: BareStep, args: argparse.Namespace, res: Results, root: Path, batch: dict, n_parts: int
) -> None:
    """The MoE step with and without the CLIP-embedding distillation term, interleaved (medians)."""
    cfg = make_config(args, root, "small", "model.loss.distill=true")
    distill = BareStep(cfg, batch, n_parts, clip_dim=args.clip_dim)
    # counted FLOPs too: on a loaded CPU a ~1% difference in time is within the rounds' noise
    res.update(distill_flops_ratio=distill.flops_per_image() / res.data["flops_per_image_moe"])
    print(
        f"distillation on / off, counted FLOPs per image (fwd+bwd incl. teacher): {res.data['distill_flops_ratio']:.4f}"
    )
    rates = interleaved({"moe": moe, "distill": distill}, args.rounds, args.steps, args.warmup)
    ratio = statistics.median(d / m for d, m in zip(rates["step_distill"], rates["step_moe"], strict=True))
    res.update(
        bare_step_distill_images_per_s=statistics.median(rates["step_distill"]),
        distill_step_ratio=ratio,
        distill_fwd_bwd_ratio=statistics.median(
            d / m for d, m in zip(rates["fwd_bwd_distill"], rates["fwd_bwd_moe"], strict=True)
        ),
    )
    print(
        f"distillation on / off, MoE full step: {ratio:.3f} (cost {1 - ratio:+.1%}; target >= 0.95); "
        f"fwd+bwd {res.data['distill_fwd_bwd_ratio']:.3f} (median of {args.rounds} interleaved rounds)",
        flush=True,
    )


def main() -> None:
    import torch

    args = parse_args()
    budget = Budget(args.budget_s)
    on_gpu = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name() if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
    setting = f"{args.arch} {args.img[0]}x{args.img[1]}/{args.patch}, batch {args.batch}"
    setting += f", 2 global + {args.local_crops} local crops, precision {args.precision}, {args.workers} workers"
    print(f"device: {device_name}; {setting}", flush=True)
    res = Results(args.out, part="pretrain", device=device_name, arch=args.arch, img=list(args.img))
    res.update(batch=args.batch, local_crops=args.local_crops, precision=args.precision, workers=args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        write_corpus(root, "small", args.images, args.shards, clip_dim=args.clip_dim)
        print(f"corpus: {args.images} images in {args.shards} shards ({time.perf_counter() - t:.1f}s)", flush=True)

        from pretrain.data import build_stream

        cfg = make_config(args, root, "small")
        stream = build_stream(
            cfg.data, global_hw=tuple(cfg.model.img_size), patch_size=cfg.model.patch_size, seed=0, clip_embed=True
        )
        batch = next(stream.batches())  # with clip_embed; the models without distillation ignore it
        n_parts = len(stream.labelset.parts)
        del stream

        sizes = [("small", args.images)]
        if not args.skip_rss:
            write_corpus(root, "large", args.images * 4, args.shards * 4, seed=1, clip_dim=args.clip_dim)
            sizes.append(("large", args.images * 4))
        for corpus, n in sizes:
            loader = loader_rss(root, corpus, args.loader_batches)
            res.update(**{f"loader_{corpus}_{k}": v for k, v in loader.items()})
            rss = f"peak RSS main {loader['rss_main_mb']:.0f} MB, largest worker {loader['rss_worker_mb']:.0f} MB"
            print(f"loader alone, {n} images: {loader['images_per_s']:.1f} img/s, {rss}", flush=True)
        benches = {
            tag: BareStep(make_config(args, root, "small", f"model.moe.enabled={moe}"), batch, n_parts)
            for tag, moe in (("moe", True), ("dense", False))
        }
        for tag, bench in benches.items():
            res.update(**{f"flops_per_image_{tag}": bench.flops_per_image()})
            print(f"{tag}: {res.data[f'flops_per_image_{tag}'] / 1e9:.1f} GFLOP/image fwd+bwd incl. teacher (counted)")
        t = time.perf_counter()
        bare_section(benches, args, res, "eager", args.rounds)
        model_round_s = (time.perf_counter() - t) / (2 * args.rounds)  # one model's fwd+bwd and step runs
        distill_section(benches["moe"], args, res, root, batch, n_parts)

        loop_section(benches["moe"], args, res, root, budget)

        if on_gpu:
            for tag, bench in benches.items():
                res.update(**{f"peak_mem_{tag}_gib": getattr(bench, "peak_mem_bytes", 0) / 2**30})
            report_mfu(res, device_name, args.peak_flops)

        if args.compile:
            compiled_section(benches, args, res, budget, model_round_s)

        if on_gpu:  # again after the compiled runs (a time guard may kill those: these figures are kept)
            for tag, bench in benches.items():
                res.update(**{f"peak_mem_{tag}_gib": getattr(bench, "peak_mem_bytes", 0) / 2**30})
            report_mfu(res, device_name, args.peak_flops)
    print(res.json_line())


def loop_section(moe: BareStep, args: argparse.Namespace, res: Results, root: Path, budget: Budget) -> None:
    """Loop rounds (stream + trainer step), each bracketed by bare fwd+bwd runs of the same model (before: the
    previous round's after), so the ratio compares runs made under the same conditions."""
    loops, ratios = [], []
    before, round_s = res.data["bare_fwd_bwd_moe_images_per_s"], 0.0
    loop_rounds = args.rounds if args.loop_rounds is None else args.loop_rounds
    for r in range(loop_rounds):
        if r > 0 and not budget.allows(round_s, f"loop rounds {r}..{loop_rounds - 1}", res):
            break
        t = time.perf_counter()
        loops.append(loop(make_config(args, root, "small"), root / f"run{r}", args.steps, args.warmup))
        after = moe.images_per_s(moe.fwd_bwd, args.steps, args.warmup)
        round_s = time.perf_counter() - t
        ratios.append(loops[-1] / ((before + after) / 2))
        print(f"loop round {r}: {loops[-1]:.1f} img/s; bare fwd+bwd before/after {before:.1f} / {after:.1f} img/s")
        before = after
        res.update(loop_images_per_s=statistics.median(loops), loop_ratio=statistics.median(ratios))
    res.update(loop_ratio_vs_step=res.data["loop_images_per_s"] / res.data["bare_step_moe_images_per_s"])
    print(f"loop (stream + trainer step, MoE): {res.data['loop_images_per_s']:.1f} img/s (median)")
    print(
        f"loop / bare fwd+bwd: {res.data['loop_ratio']:.3f} (target >= 0.85); / bare step "
        f"{res.data['loop_ratio_vs_step']:.3f}",
        flush=True,
    )


def compiled_section(
    benches: dict[str, BareStep], args: argparse.Namespace, res: Results, budget: Budget, model_round_s: float
) -> None:
    """One compiled round per model (compiling takes a minute or more each on a GPU machine), MoE first."""
    for tag, bench in benches.items():
        if not budget.allows(COMPILE_ALLOWANCE_S + model_round_s, f"torch.compile of the {tag} model", res):
            break
        try:
            t = time.perf_counter()
            bench.compile(args.compile_backend)
            bare_section({tag: bench}, args, res, "compiled", 1)
            res.update(**{f"compile_{tag}_s": time.perf_counter() - t})
        except Exception as exc:  # noqa: BLE001 - a compile failure must not lose the eager figures
            res.note(f"torch.compile of {tag} failed: {type(exc).__name__}: {str(exc)[:300]}")
            print(f"torch.compile of {tag} failed: {type(exc).__name__}: {exc}", flush=True)


def report_mfu(res: Results, device_name: str, measured_peak: float | None) -> None:
    """MFU = counted FLOPs per image x images/s / peak, for every rate measured, against each known peak."""
    peaks = {"datasheet": datasheet_peak(device_name), "matmul": measured_peak}
    for peak_name, peak in peaks.items():
        if not peak:
            continue
        res.update(**{f"peak_flops_{peak_name}": peak})
        for key, rate in list(res.data.items()):
            if not (key.startswith(("bare_", "loop_images")) and key.endswith("_images_per_s")):
                continue
            tag = "dense" if "_dense" in key else "moe"
            name = key.removesuffix("_images_per_s").removeprefix("bare_")
            res.update(**{f"mfu_{peak_name}_{name}": rate * res.data[f"flops_per_image_{tag}"] / peak})
        line = ", ".join(
            f"{k[len(f'mfu_{peak_name}_') :]} {v:.1%}" for k, v in res.data.items() if k.startswith(f"mfu_{peak_name}_")
        )
        print(f"MFU vs {peak_name} {peak / 1e12:.0f} TFLOP/s: {line}", flush=True)


if __name__ == "__main__":
    main()
