"""A seeded, resumable stream of samples drawn from weighted sources.

Each draw picks a source with probability proportional to its weight, then takes that
source's next sample in a per-epoch permutation. The whole state is a few integers and
the generator's state, so a resumed run continues with exactly the next sample. A
streaming source (size ``None``) orders its own samples: the draw only names it.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class Mixture:
    def __init__(self, sizes: list[int | None], weights: list[float], seed: int) -> None:
        if len(sizes) != len(weights) or not sizes:
            raise ValueError("one weight per source is needed")
        total = float(sum(weights))
        self.sizes = sizes
        self.probs = np.asarray(weights, dtype=np.float64) / total
        self.seed = seed
        self.picker = np.random.default_rng([seed, 0xC0FFEE])
        self.epochs = [0] * len(sizes)
        self.cursors = [0] * len(sizes)
        self._orders = [self._order(i) for i in range(len(sizes))]

    def _order(self, source: int) -> np.ndarray | None:
        if self.sizes[source] is None:
            return None
        rng = np.random.default_rng([self.seed, source, self.epochs[source]])
        return rng.permutation(self.sizes[source])

    def next(self) -> tuple[int, int | None]:
        """``(source, index)`` of the next sample; the index is None for a streaming source."""
        source = (
            0 if len(self.sizes) == 1 else int(self.picker.choice(len(self.sizes), p=self.probs))
        )
        if self.sizes[source] is None:
            return source, None
        if self.cursors[source] == self.sizes[source]:
            self.epochs[source] += 1
            self.cursors[source] = 0
            self._orders[source] = self._order(source)
        index = int(self._orders[source][self.cursors[source]])
        self.cursors[source] += 1
        return source, index

    def state_dict(self) -> dict[str, Any]:
        return {
            "sizes": list(self.sizes),
            "epochs": list(self.epochs),
            "cursors": list(self.cursors),
            "picker": self.picker.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["sizes"]) != list(self.sizes):
            raise ValueError(
                f"the data sources changed since the checkpoint: sample counts (None: "
                f"streaming) {state['sizes']} then, {self.sizes} now"
            )
        self.epochs, self.cursors = list(state["epochs"]), list(state["cursors"])
        self.picker.bit_generator.state = state["picker"]
        self._orders = [self._order(i) for i in range(len(self.sizes))]

    @property
    def epoch(self) -> float:
        """Epochs of the first source completed, as a fraction (for progress reports)."""
        return self.epochs[0] + self.cursors[0] / self.sizes[0]
