"""The one progress display of every stage: a tqdm bar with count, rate and ETA, silent when quiet.

Stages call ``progress(total, description, quiet=..., unit=...)`` and get ``advance(n, **fields)``;
fields (loss=0.41, step="gt metrics") show after the rate. tqdm writes to stderr, so a stage's
stdout stays its results.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def progress(
    total: int, description: str, *, quiet: bool, unit: str = "img", initial: int = 0
) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, **fields)``: one bar of ``total`` units with throughput and ETA unless ``quiet``;
    ``initial`` units are already done (a resumed run)."""
    if quiet:
        yield lambda n=1, **fields: None
        return
    from tqdm import tqdm

    with tqdm(
        total=total, initial=initial, desc=description, unit=unit, unit_scale=total >= 10_000, dynamic_ncols=True,
        smoothing=0.1,
    ) as bar:  # fmt: skip

        def advance(n: int = 1, **fields: Any) -> None:
            if fields:
                text = {k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in fields.items()}
                bar.set_postfix(text, refresh=False)
            bar.update(n)

        yield advance
