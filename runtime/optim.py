"""Optimizers that update a module's live weight buffers in place.

The weights are backend buffers (numpy arrays for ONNX Runtime, torch tensors for the torch
backend), so the math is written against an array namespace ``xp`` (the ``numpy`` or ``torch``
module) using only calls both share: ``multiply/add/subtract/divide(a, b, out=c)``,
``sqrt(a, out=b)``, ``zeros_like``, ``sum`` and in-place operators. State is allocated at
construction; a step allocates nothing param-sized. Temporaries live in ONE scratch buffer of at
most ``CHUNK`` elements: every update is applied chunk by chunk over flat views (the same
element-wise operations, so the same results), which keeps a whole parameter-sized scratch copy
out of peak memory (44 MB for ResNet-18).

Formulas follow ``torch.optim.SGD`` / ``torch.optim.Adam`` (foreach=False): L2 weight decay is
added to the gradient, the momentum buffer starts as the first gradient, Adam uses
``step_size = lr / bc1`` and ``denom = sqrt(v) / sqrt(bc2) + eps``. torch fuses some products
into FMAs (``add(alpha=)``, ``lerp``), which two-rounding ``xp`` calls cannot, so results agree to
float32 rounding, not bit for bit.

Each pipeline module owns one optimizer over its own tensors and updates independently, so
``clip_norm`` clips by the global L2 norm of *that module's* gradient, not the whole model's.

Where the weights and the gradient each sit in one contiguous buffer (the ONNX Runtime backend,
``buffers.flat_views``), the state is allocated the same way and a step runs once over the whole
module instead of once per tensor: the same element-wise operations, far fewer Python calls.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from .buffers import contiguous_span, flat_views

Array = Any  # numpy.ndarray or torch.Tensor

#: elements per update chunk (1 MiB of float32): large enough to vectorise, small enough for L2
CHUNK = 1 << 18


def to_host(a: Array) -> np.ndarray:
    """Host numpy copy of a numpy array or a (possibly device) torch tensor, without importing torch."""
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy().copy()
    return np.array(a, copy=True)


class Optimizer:
    """Shared bookkeeping: hyper-parameters, scratch, gradient clipping, checkpoint state."""

    def __init__(self, params: dict[str, Array], xp: Any, lr: float, weight_decay: float = 0.0,
                 clip_norm: float | None = None, normalize: float | None = None) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if clip_norm is not None and clip_norm <= 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm}")
        if normalize is not None and not 0.0 < normalize < 1.0:
            raise ValueError(f"normalize (the running mean's decay) must be in (0, 1) or None, got {normalize}")
        self.params = params
        self.xp = xp
        self.lr = lr
        self.weight_decay = weight_decay
        self.clip_norm = clip_norm
        self.steps = 0
        largest = max(params.values(), key=lambda p: math.prod(p.shape), default=None)
        self._span = contiguous_span(list(params.values()))  # all weights in one buffer (numpy)
        self._buf = None if largest is None else xp.zeros_like(
            (_flat(largest) if self._span is None else self._span)[:CHUNK])
        self._state: dict[str, dict[str, Array]] = {}  # state name -> tensor name -> buffer
        self._per_tensor: list[str] = []  # states shaped like the weights, in group order
        self._state_spans: list[Array] = []  # each such state as one buffer, where the weights are one
        self.normalize = normalize
        #: when set, each step adds the estimate's norm ‖g‖ (before clipping) to ``norm_sum`` (run logs)
        self.track_norm = False
        self.norm_sum, self.norm_steps = 0.0, 0
        if normalize is not None and largest is not None:
            self._state["noise"] = {"mean_square": xp.zeros_like(_flat(largest)[:1])}

    def _weight_state(self, name: str) -> None:
        """Add a zeroed state shaped like the weights (one buffer where the weights are one)."""
        if self._span is not None:
            views = flat_views([p.shape for p in self.params.values()])
            self._state[name] = dict(zip(self.params, views, strict=False))
            self._state_spans.append(contiguous_span(views))
        else:
            self._state[name] = {k: self.xp.zeros_like(p) for k, p in self.params.items()}
        self._per_tensor.append(name)

    def _groups(self, grads: dict[str, Array]) -> list[tuple[Array, ...]]:
        """(weight, gradient, *weight-shaped states) to update together: the whole module as one
        group when every one of them is a single buffer, else one group per tensor."""
        if self._span is not None and list(grads) == list(self.params):
            grad = contiguous_span(list(grads.values()))
            if grad is not None:
                return [(self._span, grad, *self._state_spans)]
        return [(self.params[k], g, *(self._state[n][k] for n in self._per_tensor)) for k, g in grads.items()]

    def step(self, grads: dict[str, Array], lr: float | None = None) -> None:
        """Apply one update in place; ``grads`` is used as scratch; ``lr`` overrides ``self.lr``."""
        if grads.keys() != self.params.keys():
            raise ValueError(f"gradient names {sorted(grads)} do not match parameters {sorted(self.params)}")
        self.steps += 1
        if self.track_norm:
            self.norm_sum += math.sqrt(self._sum_squares(list(grads.values())))
            self.norm_steps += 1
        groups = self._groups(grads)
        # norms are summed tensor by tensor (a float32 sum's rounding depends on its extent); the
        # scaling then runs over the groups
        if self.normalize is not None and self.params:
            self._normalize(list(grads.values()), [g for _, g, *_ in groups])
        if self.clip_norm is not None:
            self._clip(list(grads.values()), [g for _, g, *_ in groups])
        if self.weight_decay:
            for p, grad, *_ in groups:
                for pc, g, s in self._chunks(p, grad):
                    g += self.xp.multiply(pc, self.weight_decay, out=s)
        self._update(groups, self.lr if lr is None else lr)

    def _chunks(self, *arrays: Array) -> Iterator[tuple[Array, ...]]:
        """Aligned flat slices (≤ CHUNK elements) of same-sized tensors, plus the scratch slice."""
        flats = [_flat(a) for a in arrays]
        n = flats[0].shape[0]
        for i in range(0, n, CHUNK):
            j = min(i + CHUNK, n)
            assert self._buf is not None  # allocated whenever there is a parameter to chunk
            yield (*(f[i:j] for f in flats), self._buf[: j - i])

    def _update(self, groups: list[tuple[Array, ...]], lr: float) -> None:
        raise NotImplementedError

    def _sum_squares(self, grads: list[Array]) -> float:
        sq = 0.0
        for grad in grads:
            for g, s in self._chunks(grad):
                sq += float(self.xp.sum(self.xp.multiply(g, g, out=s)))
        return sq

    def _normalize(self, grads: list[Array], groups: list[Array]) -> None:
        """Divide g by the running RMS of this module's estimates (bias-corrected EMA of mean(g²)).

        A forward-gradient estimate is mostly noise (E‖g‖² ≈ D·‖∇L‖² for D perturbed weights), so
        its RMS tracks the noise level: dividing by it gives SGD steps of a stable size whatever the
        module's width or α. Cost: one extra pass over g per step. Adam already normalises per element.
        """
        assert self.normalize is not None  # step() calls this only when normalizing
        ms = self._state["noise"]["mean_square"]
        size = sum(math.prod(g.shape) for g in grads)
        ms *= self.normalize
        ms += (1.0 - self.normalize) * self._sum_squares(grads) / size
        rms = math.sqrt(float(ms[0]) / (1.0 - self.normalize ** self.steps))
        for g in groups:
            g *= 1.0 / (rms + 1e-12)

    def _clip(self, grads: list[Array], groups: list[Array]) -> None:
        """Scale grads by min(1, clip_norm / (norm + 1e-6)) like torch.nn.utils.clip_grad_norm_."""
        coef = self.clip_norm / (self._sum_squares(grads) ** 0.5 + 1e-6)
        if coef < 1.0:
            for g in groups:
                g *= coef

    def state_dict(self) -> dict[str, np.ndarray | float | int]:
        """Host copies for checkpoints: ``steps`` and ``<state>.<tensor>`` arrays."""
        out: dict[str, np.ndarray | float | int] = {"steps": self.steps}
        for name, bufs in self._state.items():
            for k, b in bufs.items():
                out[f"{name}.{k}"] = to_host(b)
        return out

    def load_state_dict(self, state: dict[str, np.ndarray | float | int]) -> None:
        """Restore a ``state_dict`` by writing into the existing buffers in place."""
        expected = {"steps"} | {f"{n}.{k}" for n, bufs in self._state.items() for k in bufs}
        if set(state) != expected:
            raise ValueError(f"state keys {sorted(state)} do not match {sorted(expected)}")
        for name, bufs in self._state.items():
            for k, b in bufs.items():
                src = np.asarray(state[f"{name}.{k}"])
                if tuple(src.shape) != tuple(b.shape):
                    raise ValueError(f"{name}.{k}: shape {src.shape} != {tuple(b.shape)}")
                b[...] = self.xp.asarray(src)
        self.steps = int(state["steps"])


class SGD(Optimizer):
    """SGD with optional heavy-ball momentum (dampening 0, no Nesterov), as torch.optim.SGD."""

    def __init__(self, params: dict[str, Array], xp: Any, lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0, clip_norm: float | None = None, normalize: float | None = None) -> None:
        super().__init__(params, xp, lr, weight_decay, clip_norm, normalize)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        if momentum:
            self._weight_state("momentum")

    def _update(self, groups: list[tuple[Array, ...]], lr: float) -> None:
        for p, g, *momentum in groups:
            if momentum:
                buf = momentum[0]
                if self.steps == 1:
                    buf[...] = g
                else:
                    buf *= self.momentum
                    buf += g
                g = buf
            for pc, gc, s in self._chunks(p, g):
                pc -= self.xp.multiply(gc, lr, out=s)


class Adam(Optimizer):
    """Adam with L2 weight decay added to the gradient (not AdamW), as torch.optim.Adam."""

    def __init__(self, params: dict[str, Array], xp: Any, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, clip_norm: float | None = None,
                 normalize: float | None = None) -> None:
        super().__init__(params, xp, lr, weight_decay, clip_norm, normalize)
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = eps
        self._weight_state("exp_avg")
        self._weight_state("exp_avg_sq")

    def _update(self, groups: list[tuple[Array, ...]], lr: float) -> None:
        xp = self.xp
        beta1, beta2 = self.betas
        step_size = lr / (1 - beta1**self.steps)
        bias_correction2_sqrt = (1 - beta2**self.steps) ** 0.5
        for group in groups:
            for p, g, m, v, s in self._chunks(*group):
                # m.lerp_(g, 1 - beta1): m + (1 - beta1) * (g - m)
                m += xp.multiply(xp.subtract(g, m, out=s), 1 - beta1, out=s)
                # v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                v *= beta2
                v += xp.multiply(xp.multiply(g, 1 - beta2, out=s), g, out=s)
                # denom (in g, no longer needed) = sqrt(v) / sqrt(bc2) + eps
                denom = xp.add(xp.divide(xp.sqrt(v, out=g), bias_correction2_sqrt, out=g), self.eps, out=g)
                # p.addcdiv_(m, denom, value=-step_size)
                p -= xp.divide(xp.multiply(m, step_size, out=s), denom, out=s)


def _flat(a: Array) -> Array:
    """1-D view of a contiguous buffer (a reshape of a strided one would silently copy)."""
    contiguous = a.is_contiguous() if hasattr(a, "is_contiguous") else a.flags.c_contiguous
    if not contiguous:
        raise ValueError("optimizer buffers must be contiguous")
    return a.reshape(-1)


OPTIMIZERS = ("sgd", "momentum", "adam")


def make_optimizer(name: str, params: dict[str, Array], xp: Any, **kw: Any) -> Optimizer:
    """Build an optimizer by config name; ``momentum`` is SGD with momentum 0.9 unless given."""
    if name == "sgd":
        return SGD(params, xp, **kw)
    if name == "momentum":
        return SGD(params, xp, **{"momentum": 0.9, **kw})
    if name == "adam":
        return Adam(params, xp, **kw)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
