"""benchmarks/gpu_all.sh, the one-command GPU evidence script, checked on the CPU (GPU_ALL_DRY_RUN=1).

Only a lent GPU machine produces its numbers; these runs make sure the script itself does not rot:
every part runs its real code path at tiny sizes and the summary JSON holds the figures the README quotes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_all.sh"
FAKE_ABLATION = """echo "fake ablation in $OUT"
echo '{"cell": 1}' > "$OUT/result.json"
echo "{\\"ablation\\": \\"fake\\", \\"tiny\\": \\"${TINY:-}\\"}"
"""


def run_gpu_all(out: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "GPU_ALL_DRY_RUN": "1", "OUT": str(out), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=full_env, timeout=600)


def last_json(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_dry_run_measures_every_part_and_returns_what_the_device_tool_can_carry(tmp_path: Path) -> None:
    fake = tmp_path / "gpu_ablation.sh"
    fake.write_text(FAKE_ABLATION)
    out = tmp_path / "out"
    summary = last_json(run_gpu_all(out, GPU_ALL_ABLATION_SCRIPT=str(fake)))

    assert summary["dry_run"] is True and summary["device"] == "cpu"
    assert {name: part["status"] for name, part in summary["parts"].items()} == {
        "label": "ok",
        "pretrain": "ok",
        "ablation": "ok",
    }
    label = summary["label"]
    assert label["random_weights"] is True
    for key in ("e2e_images_per_s", "bare_images_per_s", "decode_images_per_s", "gpu_decode_images_per_s"):
        assert label[key] > 0, key
    assert label["label_bytes_per_image"] > 0
    assert label["e2e_over_bare"] == round(label["e2e_images_per_s"] / label["bare_images_per_s"], 4)
    pretrain = summary["pretrain"]
    for tag in ("moe", "dense"):  # eager only: the dry run does not compile (tracing takes most of a minute)
        assert pretrain[f"bare_step_{tag}_images_per_s"] > 0 and pretrain[f"bare_fwd_bwd_{tag}_images_per_s"] > 0
    assert pretrain["loop_images_per_s"] > 0 and pretrain["loader_small_images_per_s"] > 0
    # the ablation script ran in its own folder with TINY=1; its JSON line and its files came back
    assert summary["ablation"] == {"ablation": "fake", "tiny": "1"}
    with tarfile.open(out / "ablation.tar.gz") as tar:
        assert "./result.json" in tar.getnames()

    # the device tool brings back at most 8 files, named in letters, digits, '.', '_' and '-'
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    assert json.loads((out / "gpu_all.json").read_text()) == summary
    assert "labeling end-to-end / bare" in (out / "gpu_all.log").read_text()


def test_parts_that_do_not_fit_the_budget_or_are_missing_are_skipped_with_a_note(tmp_path: Path) -> None:
    missing = tmp_path / "gpu_ablation.sh"
    summary = last_json(run_gpu_all(tmp_path / "out", GPU_ALL_BUDGET_S="0", GPU_ALL_ABLATION_SCRIPT=str(missing)))
    for name in ("label", "pretrain"):
        assert summary["parts"][name]["status"].startswith("skipped: 0 s of the 0 s budget left"), summary["parts"]
    assert summary["parts"]["ablation"]["status"] == f"skipped: {missing} does not exist"
    assert "label" not in summary and "pretrain" not in summary and "ablation" not in summary
