"""Loading resume states without unpickling arbitrary objects.

Resume states (transfer's ``checkpoint.pt``, clip-train's state) hold only tensors and plain types
(dicts, lists, numbers, strings), so they load with ``torch.load(..., weights_only=True)``: a file that
names any other class is refused instead of unpickled, since unpickling can run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import ClaspError


def load_plain_state(path: Path, *, what: str) -> dict[str, Any]:
    """The dict saved at ``path`` by ``torch.save``, loaded with ``weights_only=True``; one-line error otherwise."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise ClaspError(f"{path} is not a readable {what} ({_reason(exc)}); delete it to start over") from None
    if not isinstance(state, dict):
        raise ClaspError(f"{path} is not a {what} (it holds a {type(state).__name__}); delete it to start over")
    return state


def _reason(exc: Exception) -> str:
    """The informative part of torch's weights_only error (it wraps it in paragraphs of general advice)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:  # "WeightsUnpickler error: Unsupported global: GLOBAL x.y was not an allowed global ..."
        if "GLOBAL " in line:
            name = line[line.index("GLOBAL ") + len("GLOBAL ") :].split(" was not")[0].split(" whose")[0]
            return f"it names {name}, which is not a tensor or plain type"
    advice = ("Weights only load failed", "Check the documentation", "Please file an issue", "(1)", "(2)")
    return next((line for line in lines if not line.startswith(advice)), lines[0] if lines else type(exc).__name__)
