"""Dropout masks drawn on the host from the seeded counter-based stream and fed to the graphs.

ONNX's random ops differ between ONNX Runtime, torch and TensorRT, so no graph draws its own
mask: the runtime draws it here and feeds it as ``mask.<node>`` (contract.py). A mask is a
function of (seed, step, module, layer, global sample index) alone, so it is the same for the
primal and every tangent, on resume, on every backend, in the reference and in the ``bp``
baseline, and a data-parallel worker holding samples [offset, offset + n) draws exactly its rows.

Stream layout (numpy ``Philox4x64``, as runtime/perturb.py; the top bit of counter word 2 keeps
these streams apart from the tangents')::

    key     = seed
    counter = [0, 0, 2**63 | module << 24 | layer, step]

Sample i's values are the 32-bit words of blocks [i·b, (i+1)·b) of that stream, b = ceil(size/8)
(a block is four 64-bit words); u = word / 2**32 and the element is kept where u >= p, as
1/(1 − p) (0 where dropped). Drop-path draws one value per sample (size 1).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

_DOMAIN = 1 << 63
_WORDS_PER_BLOCK = 8  # 32-bit words in one Philox4x64 block


@dataclass(frozen=True)
class DropoutSite:
    """One dropout (or drop-path) node of a module's program."""

    name: str
    layer: int  # its index among the module's dropout nodes (the stream key)
    p: float
    per_sample: bool
    shape: tuple[int, ...]  # per-sample output shape

    @property
    def mask_shape(self) -> tuple[int, ...]:
        """The mask's per-sample shape: the output's, or all 1s for drop-path."""
        return tuple(1 for _ in self.shape) if self.per_sample else self.shape

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "layer": self.layer, "p": self.p, "per_sample": self.per_sample,
                "shape": list(self.shape)}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> DropoutSite:
        return DropoutSite(d["name"], int(d["layer"]), float(d["p"]), bool(d["per_sample"]), tuple(d["shape"]))


def dropout_sites(nodes: Iterable[Any]) -> list[DropoutSite]:
    """The dropout nodes of a program (``Node`` objects), numbered in program order."""
    drops = [n for n in nodes if n.op == "dropout"]
    return [DropoutSite(n.name, i, float(n.attrs["p"]), bool(n.attrs["per_sample"]), tuple(n.shape))
            for i, n in enumerate(drops)]


def draw_masks(sites: Iterable[DropoutSite], seed: int, step: int, module: int, n: int,
               sample_offset: int = 0) -> dict[str, np.ndarray]:
    """Masks (n, *mask_shape) by node name for samples [sample_offset, sample_offset + n) of a step."""
    out: dict[str, np.ndarray] = {}
    for site in sites:
        size = math.prod(site.mask_shape)
        blocks = -(-size // _WORDS_PER_BLOCK)
        gen = np.random.Philox(key=seed, counter=[0, 0, _DOMAIN | module << 24 | site.layer, step])
        if sample_offset:
            gen.advance(sample_offset * blocks)
        words = gen.random_raw(n * blocks * 4).view(np.uint32).reshape(n, blocks * _WORDS_PER_BLOCK)[:, :size]
        keep = words >= np.uint32(min(int(site.p * 2.0**32), (1 << 32) - 1))
        out[site.name] = (keep * np.float32(1.0 / (1.0 - site.p))).astype(np.float32).reshape(n, *site.mask_shape)
    return out
