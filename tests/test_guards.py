from pathlib import Path

import pytest

from pipeline.errors import ClaspError
from pipeline.guards import ensure_free_space, free_bytes, resolve_device


def test_refuses_when_disk_too_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLASP_DISK_LIMIT_BYTES", str(10_000))
    assert free_bytes(tmp_path / "not" / "yet") == 10_000
    ensure_free_space(tmp_path, 5_000, what="label shards")
    with pytest.raises(ClaspError, match=r"not enough disk space for label shards in .*needs about"):
        ensure_free_space(tmp_path / "out", 50_000, what="label shards")


def test_device_resolution() -> None:
    import torch

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ClaspError, match="no CUDA GPU is visible"):
            resolve_device("cuda")
    with pytest.raises(ClaspError, match="unknown device"):
        resolve_device("tpu")
