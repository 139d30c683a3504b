"""Pieces shared by the GPU benchmarks of ``benchmarks/gpu_all.sh``: the bf16 ceiling, time budgets, results files.

    python -m benchmarks.gpu_common              # the measured bf16 matrix-product rate as one JSON line
    python -m benchmarks.gpu_common summary OUT WORK  # OUT/{label,pretrain,ablation}.json: table + JSON line

MFU is reported against two ceilings: the datasheet's dense bf16 rate (H100/H200 SXM: 989 TFLOP/s) and the
rate an 8192^3 bf16 matrix product reaches on the same card in the same run (about 790 TFLOP/s on this
workplace's H200s), which is what "the bf16 FLOP limit" means in practice.
"""

from __future__ import annotations

import io
import json
import os
import random
import statistics
import time
from pathlib import Path

DATASHEET_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H200": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
}


def datasheet_peak(device_name: str) -> float | None:
    """Dense bf16 FLOP/s of a known GPU by name (first matching key), else None."""
    return next((v for k, v in DATASHEET_BF16_FLOPS.items() if k in device_name), None)


def matmul_peak_flops(n: int = 8192, reps: int = 10) -> float:
    """Median FLOP/s of an n^3 bf16 matrix product on random data (CUDA events, after 3 warm-ups)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times)


class Budget:
    """Wall-clock seconds left for one part; a measurement that would not fit is skipped with a note."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, need_s: float, what: str, results: Results) -> bool:
        if self.left_s() >= need_s:
            return True
        note = f"skipped {what}: needs ~{need_s:.0f} s, {max(0.0, self.left_s()):.0f} s of this part's budget left"
        print(note, flush=True)
        results.note(note)
        return False


class Results:
    """Figures of one benchmark part, rewritten to ``path`` (atomically) after every update.

    A part killed by its time guard therefore leaves everything it had measured.
    """

    def __init__(self, path: str | Path | None, **fixed) -> None:
        self.path = Path(path) if path else None
        self.data: dict = dict(fixed)

    def update(self, **figures) -> None:
        self.data.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in figures.items()})
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            os.replace(tmp, self.path)

    def note(self, text: str) -> None:
        self.update(notes=[*self.data.get("notes", []), text])

    def json_line(self) -> str:
        return json.dumps(self.data)


def person_jpeg(seed: int, quality: int = 95) -> tuple[bytes, int, int]:
    """A LUPerson-sized JPEG (96-384 px high, width 0.30-0.55 of that) and its width, height: upscaled,
    blurred noise that compresses like a photo rather than like flat colour."""
    from PIL import Image, ImageFilter

    rng = random.Random(seed)
    h = rng.randint(96, 384)
    w = max(32, int(h * rng.uniform(0.30, 0.55)))
    sw, sh = max(2, w // 8), max(2, h // 8)
    small = Image.frombytes("RGB", (sw, sh), rng.randbytes(3 * sw * sh))
    img = small.resize((w, h), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(2))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue(), w, h


def _write_jpegs(job: tuple[str, range]) -> int:
    folder, ids = job
    for i in ids:
        path = Path(folder) / f"v{i % 64:02d}" / f"f{i:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(person_jpeg(i)[0])
    return len(ids)


def write_person_folder(folder: Path, n_images: int, processes: int) -> None:
    """``n_images`` distinct person-sized JPEGs in 64 sub-folders (a folder source for ``clasp ingest``)."""
    chunk = 512
    jobs = [(str(folder), range(s, min(s + chunk, n_images))) for s in range(0, n_images, chunk)]
    if processes <= 1:
        for job in jobs:
            _write_jpegs(job)
        return
    import multiprocessing as mp

    with mp.get_context("fork").Pool(processes) as pool:
        for _ in pool.imap_unordered(_write_jpegs, jobs):
            pass


# (part, key, label, target as (comparison, value) or None, format)
SUMMARY_ROWS = [
    ("label", "e2e_images_per_s", "labeling end-to-end images/s", None, "{:.0f}"),
    ("label", "bare_images_per_s", "labeling bare forward images/s (eager)", None, "{:.0f}"),
    ("label", "compiled_images_per_s", "labeling bare forward images/s (compiled)", None, "{:.0f}"),
    ("label", "e2e_over_bare", "labeling end-to-end / bare", (">=", 0.9), "{:.3f}"),
    ("label", "mfu_matmul", "labeling MFU (best bare, vs measured matmul)", (">=", 0.5), "{:.1%}"),
    ("label", "mfu_e2e_matmul", "labeling MFU end-to-end", (">=", 0.5), "{:.1%}"),
    ("label", "label_bytes_per_image", "label bytes per image", ("<=", 256), "{:.0f}"),
    ("label", "gpu_decode_images_per_s", "GPU JPEG decode + forward images/s", None, "{:.0f}"),
    ("pretrain", "bare_step_moe_images_per_s", "pretrain step images/s, MoE, eager", None, "{:.0f}"),
    ("pretrain", "bare_step_moe_compiled_images_per_s", "pretrain step images/s, MoE, compiled", None, "{:.0f}"),
    ("pretrain", "bare_step_dense_images_per_s", "pretrain step images/s, no MoE, eager", None, "{:.0f}"),
    ("pretrain", "bare_step_dense_compiled_images_per_s", "pretrain step images/s, no MoE, compiled", None, "{:.0f}"),
    ("pretrain", "mfu_matmul_step_moe", "pretrain MFU, MoE step, eager", (">=", 0.35), "{:.1%}"),
    ("pretrain", "mfu_matmul_step_moe_compiled", "pretrain MFU, MoE step, compiled", (">=", 0.35), "{:.1%}"),
    ("pretrain", "loop_images_per_s", "pretrain loop images/s (stream + trainer, MoE)", None, "{:.0f}"),
    ("pretrain", "loop_ratio", "pretrain loop / bare fwd+bwd", (">=", 0.85), "{:.3f}"),
    ("pretrain", "loader_small_images_per_s", "pretrain loader alone images/s", None, "{:.0f}"),
    ("pretrain", "moe_ratio", "pretrain step MoE / no MoE", (">=", 0.67), "{:.3f}"),
    ("pretrain", "peak_mem_moe_gib", "pretrain peak GPU memory, MoE (GiB)", None, "{:.1f}"),
]


def summarize(out_dir: Path, work_dir: Path) -> dict:
    """Merge the parts' JSON files under ``out_dir`` and gpu_all.sh's meta.json and parts.tsv under ``work_dir``
    into one object; print a table of the headline figures against their targets."""
    summary: dict = {"benchmark": "gpu_all"}
    meta = work_dir / "meta.json"
    if meta.is_file():
        summary.update(json.loads(meta.read_text()))
    status_file = work_dir / "parts.tsv"
    statuses = [line.split("\t") for line in status_file.read_text().splitlines()] if status_file.is_file() else []
    summary["parts"] = {name: {"status": status, "seconds": int(sec)} for name, status, sec in statuses}
    for part in ("label", "pretrain", "ablation"):
        path = out_dir / f"{part}.json"
        if path.is_file():
            try:
                summary[part] = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                summary[part] = {"unreadable": f"{path.name}: {exc}"}
    print(f"{'figure':50s} {'measured':>10s}  target")
    for part, key, label, target, fmt in SUMMARY_ROWS:
        value = summary.get(part, {}).get(key)
        shown = fmt.format(value) if isinstance(value, (int, float)) else "-"
        goal = ""
        if target is not None:
            op, ref = target
            goal = f"{op} {fmt.format(ref)}"
            if isinstance(value, (int, float)):
                goal += "  ok" if (value >= ref if op == ">=" else value <= ref) else "  MISSED"
        print(f"{label:50s} {shown:>10s}  {goal}")
    for name, part in summary["parts"].items():
        print(f"part {name}: {part['status']} ({part['seconds']} s)")
    return summary


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["summary"]:
        out = Path(sys.argv[2])
        merged = summarize(out, Path(sys.argv[3]))
        (out / "gpu_all.json").write_text(json.dumps(merged, indent=1))
        print(json.dumps(merged))
    else:
        import torch

        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        peak = matmul_peak_flops() if torch.cuda.is_available() else None
        print(json.dumps({"device": name, "matmul_bf16_flops": peak, "datasheet_bf16_flops": datasheet_peak(name)}))
