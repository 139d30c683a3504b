"""Install the torch + torchvision build this machine should have, before CLASP (``make install`` runs it).

    python tools/install_torch.py --build auto --pins .venv/torch-pins.txt

``--build``: ``auto`` (default) is ``cuda`` when ``nvidia-smi -L`` lists a GPU, else ``cpu``.
``cpu`` installs both from ``--cpu-index`` (PyTorch's CPU wheels: PyPI's x86_64 Linux wheels are CUDA
builds, several GB); the pair is resolved first (``pip install --dry-run``) and installed only if both
are CPU builds (``+cpu``), otherwise the reason is printed and PyPI's build is installed instead, since
a CPU torch beside a CUDA torchvision does not import ("operator torchvision::nms does not exist").
``cuda``: PyPI's build; ``any``: an importable pair already there, else PyPI's. A pair that already
imports with the wanted build is kept (so "install torch first" still works). ``--pins`` writes
``torch==X`` / ``torchvision==Y`` for ``pip install -c``, so installing CLASP cannot swap the build
(torchvision>=0.29 would pull torch 2.14).
Standard library only: it runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PAIR = ("torch", "torchvision")
# versions as installed (the pins must match the distributions: PyPI's torch 2.14.1 reports 2.14.1+cu130)
_PROBE = (
    "import json, torch, torchvision; from importlib.metadata import version; "
    "print(json.dumps({'torch': version('torch'), 'torchvision': version('torchvision'), 'cuda': torch.version.cuda}))"
)


def has_gpu() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    probe = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return probe.returncode == 0 and "GPU" in probe.stdout


def installed_pair() -> dict | None:
    """Versions of an importable torch + torchvision pair in this Python, or None."""
    probe = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True)
    return json.loads(probe.stdout) if probe.returncode == 0 else None


def pip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], check=check, capture_output=not check, text=True)


def resolve_cpu_pair(index: str) -> tuple[list[str] | None, str]:
    """``torch==X``, ``torchvision==Y`` that ``index`` serves as CPU builds (None if not), and what pip chose."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        args = ("install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), "--index-url", index)
        run = pip(*args, *PAIR, check=False)
        if run.returncode != 0:
            last = (run.stderr.strip().splitlines() or ["pip failed"])[-1]
            return None, f"pip could not resolve them there ({last})"
        chosen = {
            item["metadata"]["name"].lower(): item["metadata"]["version"]
            for item in json.loads(report.read_text())["install"]
        }
    versions = ", ".join(f"{name} {chosen.get(name, '?')}" for name in PAIR)
    if all(chosen.get(name, "").endswith("+cpu") for name in PAIR):
        return [f"{name}=={chosen[name]}" for name in PAIR], versions
    return None, f"pip would take {versions}, not both CPU builds"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", choices=("auto", "cpu", "cuda", "any"), default="auto")
    parser.add_argument("--cpu-index", default=CPU_INDEX)
    parser.add_argument("--pins", type=Path, help="write torch==X and torchvision==Y here (a pip constraints file)")
    args = parser.parse_args()
    build = ("cuda" if has_gpu() else "cpu") if args.build == "auto" else args.build

    pair = installed_pair()
    if pair is None or not (build == "any" or (pair["cuda"] is None) == (build == "cpu")):
        cpu_pair = None
        if build == "cpu":
            cpu_pair, detail = resolve_cpu_pair(args.cpu_index)
            if cpu_pair is None:
                print(
                    f"install_torch: no CPU build of torch + torchvision from {args.cpu_index}: {detail}. "
                    "Installing PyPI's build instead (on x86_64 Linux a CUDA build; it runs on the CPU too).",
                    flush=True,
                )
        if cpu_pair:
            pip("install", "--quiet", "--force-reinstall", "--index-url", args.cpu_index, *cpu_pair)
        else:  # --upgrade: a pair that does not import together is replaced by PyPI's newest one
            pip("install", "--quiet", "--upgrade", *PAIR)
        pair = installed_pair()
    if pair is None:
        print("install_torch: torch + torchvision were installed but do not import together", file=sys.stderr)
        return 1
    kind = f"CUDA {pair['cuda']} build" if pair["cuda"] else "CPU build"
    print(f"install_torch: torch {pair['torch']} ({kind}), torchvision {pair['torchvision']} (asked: {build})")
    if args.pins:
        args.pins.write_text("".join(f"{name}=={pair[name]}\n" for name in PAIR))
    return 0


if __name__ == "__main__":
    sys.exit(main())
