"""P x K identity sampler: every batch holds P identities with K images each (needed by batch-hard triplet).

An epoch follows torchreid's ``RandomIdentitySampler``: each identity's images are shuffled and cut
into groups of K (identities with fewer than K images are sampled with replacement up to K, an
incomplete last group is dropped); batches then draw P identities at random among those with groups
left, until fewer than P remain. The batches depend only on ``seed`` and the epoch set with
``set_epoch`` (so a resumed run sees the same ones) and are drawn up front, so ``len`` is exact.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np

from pipeline.errors import ClaspError


class PKBatchSampler:
    """Batch sampler (for ``DataLoader(batch_sampler=...)``) yielding lists of P*K dataset indices."""

    def __init__(self, pids: Sequence[int], p: int, k: int, *, seed: int = 0) -> None:
        if p < 2 or k < 2:
            raise ClaspError(f"P x K sampling needs P >= 2 identities and K >= 2 images each, got P={p}, K={k}")
        self.by_pid: dict[int, list[int]] = defaultdict(list)
        for index, pid in enumerate(pids):
            self.by_pid[int(pid)].append(index)
        if len(self.by_pid) < p:
            raise ClaspError(f"P x K sampling with P={p} needs >= {p} training identities, found {len(self.by_pid)}")
        self.p, self.k, self.seed, self.epoch = p, k, seed, 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self._make_batches(np.random.default_rng([self.seed, self.epoch])))
        return self._cache[1]

    def _make_batches(self, rng: np.random.Generator) -> list[list[int]]:
        groups: dict[int, list[list[int]]] = {}
        for pid, indices in self.by_pid.items():
            chosen = list(indices)
            if len(chosen) < self.k:
                chosen = rng.choice(chosen, size=self.k, replace=True).tolist()
            rng.shuffle(chosen)
            groups[pid] = [chosen[i : i + self.k] for i in range(0, len(chosen) - self.k + 1, self.k)]
        available = [pid for pid, g in groups.items() if g]
        batches = []
        while len(available) >= self.p:
            picked = rng.choice(len(available), size=self.p, replace=False)
            batch: list[int] = []
            for i in sorted(picked):
                batch.extend(groups[available[i]].pop())
            available = [pid for pid in available if groups[pid]]
            batches.append(batch)
        return batches

    def __len__(self) -> int:
        """Exact number of batches of the current epoch (it varies slightly between epochs)."""
        return len(self._batches())

    def __iter__(self) -> Iterator[list[int]]:
        yield from (list(b) for b in self._batches())
