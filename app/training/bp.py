"""`--method bp`: PyTorch autograd on the same model, data stream and optimizer, for comparison.

The model is rebuilt from the artifacts' model spec (any ``--model`` source, ``build_any``) and
initial weights (so FGD and backprop start from identical weights), BatchNorm runs in the artifacts'
mode (``train``: batch statistics, ``frozen``: running statistics) and the optimizer is
torch.optim's counterpart of the runtime's (same formulas). One difference: ``--clip-norm`` clips
the whole model's gradient norm here, but each pipeline module's own norm in FGD. ``--freeze-until``
freezes the same modules' parameters as it does in FGD (no gradient, no update): with the head as
the only trained module, a linear probe.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from asyncfgd.app.training import checkpoint
from asyncfgd.app.training.config import TrainConfig, TrainError
from asyncfgd.app.training.freeze import frozen_modules
from asyncfgd.exporter.model_sources import build_any
from asyncfgd.exporter.reference_modules import segment_fn, set_bn_training
from asyncfgd.exporter.trace import trace_model
from asyncfgd.runtime.artifacts import Artifacts
from asyncfgd.runtime.dual.program import module_specs
from asyncfgd.runtime.masks import draw_masks, dropout_sites
from asyncfgd.runtime.scheduler import NonFiniteLoss, StepOutcome


def make_torch_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> Any:
    """torch.optim with the runtime's meaning of each name (``momentum`` = SGD, momentum 0.9)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9 if name == "momentum" else 0.0, weight_decay=weight_decay)


def build_from_spec(spec: dict[str, Any], weights: dict[str, np.ndarray], source: Path) -> torch.nn.Module:
    """The model described by a manifest's ``model`` entry (zoo, torchvision or file), with ``weights`` loaded."""
    if spec.get("name") == "custom":
        raise TrainError(f"{source} holds a custom model, which cannot be rebuilt in PyTorch by name; "
                         f"export it with --model NAME, torchvision:NAME or PATH.py:FACTORY.")
    model = build_any(spec["name"], spec["num_classes"], tuple(spec["input_shape"]), spec.get("config", {}))
    load_into(model, weights)
    return model


def save_torch(run_dir: Path, out: Path) -> dict[str, Any]:
    """Write the run's current weights and BN statistics as a state_dict for ``build_any(**spec)``."""
    arrays, meta = checkpoint.load(run_dir / checkpoint.FILENAME)
    model = build_from_spec(meta["model_spec"], checkpoint.model_state(arrays), run_dir)
    torch.save(model.state_dict(), out)
    return meta["model_spec"]


def load_into(model: torch.nn.Module, weights: dict[str, np.ndarray]) -> None:
    """Copy weights/BN statistics by name; every tensor except BN's step counter must be given."""
    state = model.state_dict()
    missing = [k for k in state if k not in weights and not k.endswith("num_batches_tracked")]
    if missing:
        raise TrainError(f"the weights do not match the model {type(model).__name__}: missing {missing[:3]}.")
    for k, v in weights.items():
        if k in state:
            state[k] = torch.from_numpy(np.array(v, dtype=np.float32))
    model.load_state_dict(state)


class BpLearner:
    """Backpropagation with torch autograd, behind the same interface as the FGD learner."""

    def __init__(self, arts: Artifacts, cfg: TrainConfig, steps_per_epoch: int) -> None:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.model = build_from_spec(arts.manifest["model"], arts.weights, arts.root)
        self.train_bn = arts.bn_mode == "train"
        frozen = {n for m in arts.modules[:frozen_modules(arts.modules, cfg.freeze_until)] for n in m.param_names}
        for name, p in self.model.named_parameters():
            p.requires_grad_(name not in frozen)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.param_names = {n for n, _ in self.model.named_parameters()}
        self.opt = make_torch_optimizer(cfg.optimizer, self.params, cfg.lr, cfg.weight_decay)
        self.lr, self.clip_norm = cfg.lr_fn(steps_per_epoch), cfg.clip_norm
        self.step, self.seed = 0, cfg.seed
        self.specs = module_specs(arts.manifest)
        self.dropout = [dropout_sites(s.nodes) for s in self.specs]
        if any(self.dropout):  # the runtime's masks go through the traced operations (tracing/replay.py)
            trace_model(self.model, tuple(arts.manifest["model"]["input_shape"]))

    def _mode(self, training: bool) -> None:
        """Dropout as torch's own off (the runtime's masks replace it, ``_forward``); BN per the
        artifacts' mode while training."""
        self.model.eval()
        set_bn_training(self.model, training and self.train_bn)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's training forward, with the very dropout masks FGD draws for this step, so
        that the comparison stays fair (runtime/masks.py)."""
        if not any(self.dropout):
            return self.model(x)
        params, buffers = dict(self.model.named_parameters()), dict(self.model.named_buffers())
        h = x
        for k, (spec, sites) in enumerate(zip(self.specs, self.dropout, strict=True)):
            masks = {n: torch.from_numpy(v) for n, v in draw_masks(sites, self.seed, self.step, k, len(x)).items()}
            h = segment_fn(self.model, spec, masks)(h, params, buffers)
        return h

    def feed(self, x: np.ndarray, onehot: np.ndarray) -> list[StepOutcome]:
        self._mode(True)
        logits = self._forward(torch.from_numpy(x))
        loss = F.cross_entropy(logits, torch.from_numpy(onehot.argmax(axis=1)))
        if not torch.isfinite(loss):
            raise NonFiniteLoss(self.step, loss.item(), None)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        for group in self.opt.param_groups:
            group["lr"] = self.lr(self.step)
        self.opt.step()
        self.step += 1
        return [StepOutcome.of(self.step - 1, loss.item(), None, logits.detach().numpy(), onehot)]

    def finish(self) -> list[StepOutcome]:
        return []

    def estimate_norms(self) -> list[float | None]:
        """Backprop has no estimate (its exact gradient is not logged)."""
        return []

    def alphas(self, step: int) -> list[float]:
        """Backprop has no tangents."""
        return []

    def before_eval(self) -> None:
        """Backprop's weights are always current."""

    def evaluate(self, x: np.ndarray) -> np.ndarray | None:
        self._mode(False)
        with torch.no_grad():
            return self.model(torch.from_numpy(x)).numpy()

    def state(self) -> tuple[checkpoint.Arrays, dict[str, Any]]:
        arrays: checkpoint.Arrays = {}
        for k, v in self.model.state_dict().items():
            if not k.endswith("num_batches_tracked"):
                arrays[f"{'param' if k in self.param_names else 'buffer'}/{k}"] = v.numpy().copy()
        for i, st in self.opt.state_dict()["state"].items():
            arrays.update({f"optim/{i}/{k}": v.numpy().copy() for k, v in st.items() if v is not None})
        return arrays, {"next_step": self.step}

    def load_state(self, arrays: checkpoint.Arrays, meta: dict[str, Any]) -> None:
        load_into(self.model, checkpoint.model_state(arrays))
        saved = self.opt.state_dict()
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in checkpoint.section(arrays, "optim").items():
            i, name = key.split("/", 1)
            state.setdefault(int(i), {})[name] = torch.from_numpy(v.copy())
        self.opt.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
        self.step = int(meta["next_step"])

    def close(self) -> None:
        """Nothing to release."""
