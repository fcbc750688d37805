"""Where ``--model`` comes from: the zoo, torchvision, or the user's own Python file.

The one entry point is ``build_any(name, num_classes, input_shape, config)``; ``name`` takes three forms:

* ``NAME``: a zoo model (``models.build_model``; ``config`` holds its options).
* ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None, num_classes=N, **config)``. Weights
  are never downloaded: they come only from a local file (``load_any_weights``). torchvision is the optional
  ``vision`` extra (``pip install 'asyncfgd[vision]'``) and must be built for the installed torch.
* ``PATH.py:FACTORY``: attribute ``FACTORY`` of the user's file (a function, or an ``nn.Module`` class)
  called with ``config`` as keyword arguments, plus ``num_classes=N`` when it has a parameter of that name
  and ``config`` does not set it. The file is executed as a fresh module on every build (its directory on
  ``sys.path`` meanwhile, so it can import its neighbours); edits take effect at the next build.

Every model gets its spec ``{"name", "num_classes", "input_shape", "config"}`` (JSON; for a file the path is
absolute) stored on it, so ``models.model_spec(m)`` works for each source and ``build_any(**model_spec(m))``
rebuilds the same architecture (the bp baseline, validation and save-torch rebuild models this way). A
non-zoo model is run once on a zero input (eval mode, no autograd) to check that it maps ``(1, C, H, W)`` to
``(1, num_classes)`` logits, so a wrong ``--input-shape`` or class count fails here with a clear message.

For ``--weights`` on a non-zoo model the classifier head, which may differ in size from the checkpoint's
(e.g. 1000 vs 10 classes) and is then kept fresh, is the **last module in ``named_modules()`` order that has
a ``weight`` whose first dimension is ``num_classes``** (``classifier_head``); zoo models use their last block.

torch is imported only where a model is built, so the parsing helpers (``parse_source``, ``source_key``,
``short_name``) also serve where torch is absent (the artifact cache key, run directory names).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import json
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, cast

if TYPE_CHECKING:
    from torch import nn

TORCHVISION = "torchvision"
VISION_EXTRA = "pip install 'asyncfgd[vision]'"
FORMS = "a zoo name (mlp, cnn, resnet18, ...), torchvision:NAME, or PATH.py:FACTORY"
#: torchvision config keys that would fetch or pick weights: weights come only from --weights FILE
_TV_RESERVED = ("weights", "weights_backbone", "progress")
_USER_MODULE_PREFIX = "asyncfgd_user_model_"


class ModelSourceError(ValueError):
    """A ``--model`` that cannot be built; the message says why and what would work."""


@dataclass(frozen=True)
class ModelSource:
    """A parsed ``--model`` string."""

    kind: Literal["zoo", "torchvision", "file"]
    name: str  # zoo name, torchvision builder name, or the factory's attribute name
    path: Path | None = None  # file: absolute

    @property
    def spec_name(self) -> str:
        """The canonical ``--model`` string, stored in specs (a file's path made absolute)."""
        if self.kind == "torchvision":
            return f"{TORCHVISION}:{self.name}"
        if self.kind == "file":
            return f"{self.path}:{self.name}"
        return self.name


def parse_source(model: str) -> ModelSource:
    """``NAME`` / ``torchvision:NAME`` / ``PATH.py:FACTORY`` -> ModelSource (no import, no file access)."""
    head, sep, tail = model.rpartition(":")
    if sep and head == TORCHVISION:
        if not tail:
            raise ModelSourceError(f"--model {model!r}: name the torchvision model, e.g. torchvision:resnet18")
        return ModelSource("torchvision", tail)
    if sep and head.endswith(".py"):
        if not tail.isidentifier():
            raise ModelSourceError(f"--model {model!r}: after the file comes the name of the function or class "
                                   f"that builds the model, e.g. {head}:make_model")
        return ModelSource("file", tail, Path(head).expanduser().resolve())
    if model.endswith(".py"):
        raise ModelSourceError(f"--model {model!r}: also name the function or class in the file that builds the "
                               f"model, as {model}:FACTORY")
    if sep and not Path(head).suffix and "/" not in head and "\\" not in head:
        raise ModelSourceError(f"--model {model!r}: unknown model source {head!r}; --model takes {FORMS}")
    if sep or "/" in model:
        raise ModelSourceError(f"--model {model!r}: a model file must be a Python file (.py) followed by "
                               f":FACTORY; --model takes {FORMS}")
    return ModelSource("zoo", model)


def short_name(model: str) -> str:
    """A file-name-safe label for ``model`` (run directories): ``cnn``, ``torchvision-resnet18``, ``net-make``."""
    try:
        src = parse_source(model)
    except ModelSourceError:
        return re.sub(r"[^\w.-]+", "-", model).strip("-") or "model"
    if src.kind == "torchvision":
        return f"{TORCHVISION}-{src.name}"
    if src.kind == "file":
        assert src.path is not None
        return re.sub(r"[^\w.-]+", "-", f"{src.path.stem}-{src.name}")
    return re.sub(r"[^\w.-]+", "-", src.name)


def source_key(model: str) -> dict[str, Any] | None:
    """What a build of ``model`` depends on beyond its name and config, for cache keys; ``None`` for the zoo.

    A file: its absolute path and the sha256 of its bytes (not of modules it imports); torchvision: its version.
    """
    src = parse_source(model)
    if src.kind == "file":
        assert src.path is not None
        try:
            digest = hashlib.sha256(src.path.read_bytes()).hexdigest()
        except OSError as exc:
            raise ModelSourceError(f"cannot read model file {src.path}: {exc.strerror or exc}") from None
        return {"name": src.spec_name, "sha256": digest}
    if src.kind == "torchvision":
        try:
            tv = version(TORCHVISION)
        except PackageNotFoundError:
            tv = None
        return {"name": src.spec_name, TORCHVISION: tv}
    return None


# --------------------------------------------------------------------------- building


def build_any(name: str, num_classes: int, input_shape: Sequence[int],
              config: Mapping[str, Any] | None = None) -> nn.Module:
    """Build ``name`` (any of the three forms, module docstring) for (C, H, W) inputs and ``num_classes``.

    ``config``: the zoo model's options, the torchvision builder's keyword arguments, or the factory's
    keyword arguments (the CLI's ``--config KEY=VALUE``). Raises ``ModelSourceError`` (a ``ValueError``)
    with a message for the user. ``build_any(**models.model_spec(m))`` rebuilds ``m``; seed torch's RNG
    first for identical initial weights.
    """
    from .models import SPEC_ATTR, InputShape, _int_tuple, _positive_int, build_model

    src = parse_source(name)
    config = _json_config(config or {}, name)
    if src.kind == "zoo":
        reserved = sorted(set(config) & {"name", "num_classes", "input_shape"})
        if reserved:
            raise ModelSourceError(f"unknown option(s) {reserved} for model {name!r}: set the class count and "
                                   f"input shape with their own options, not --config")
        return build_model(src.name, num_classes, cast(InputShape, tuple(input_shape)), **config)
    num_classes = _positive_int("num_classes", num_classes)
    shape = _int_tuple("input_shape", input_shape, allow_empty=False)
    if len(shape) != 3:
        raise ModelSourceError(f"input_shape must be (C, H, W), got {input_shape!r}")
    if src.kind == "torchvision":
        model = _build_torchvision(src.name, num_classes, config)
    else:
        assert src.path is not None
        model = _build_file(src.path, src.name, num_classes, config)
    _check_logits(model, shape, num_classes, src.spec_name)
    setattr(model, SPEC_ATTR, {"name": src.spec_name, "num_classes": num_classes,
                               "input_shape": list(shape), "config": config})
    return model


def _json_config(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    """``config`` as it reads back from JSON (tuples become lists), so a rebuild sees exactly the same values."""
    try:
        return dict(json.loads(json.dumps(dict(config))))
    except (TypeError, ValueError) as exc:
        raise ModelSourceError(f"the config of model {name!r} must be JSON values (numbers, strings, lists, "
                               f"...): {exc}") from None


def _torchvision_models() -> ModuleType:
    try:
        import torchvision.models as tvm
    except Exception as exc:  # ImportError, or a RuntimeError/OSError from a torchvision built for another torch
        import torch

        raise ModelSourceError(
            f"--model torchvision:NAME needs torchvision, which does not import here ({type(exc).__name__}: "
            f"{exc}). Install it with `{VISION_EXTRA}`: torchvision must be the build made for the installed "
            f"torch {torch.__version__} (same version pairing and the same CPU/CUDA variant, from the same "
            f"index as torch).") from None
    return tvm


def _build_torchvision(arch: str, num_classes: int, config: dict[str, Any]) -> nn.Module:
    from torch import nn

    tvm = _torchvision_models()
    reserved = sorted(set(config) & set(_TV_RESERVED))
    if reserved:
        raise ModelSourceError(f"torchvision:{arch}: --config may not set {', '.join(reserved)}; pretrained "
                               f"weights come only from a local file, --weights FILE (a state_dict)")
    try:
        tvm.get_model_builder(arch)
    except ValueError:
        known = sorted(tvm.list_models(module=tvm))
        raise ModelSourceError(f"torchvision has no classification model {arch!r}; its models: "
                               f"{', '.join(known)}") from None
    kwargs = {"num_classes": num_classes, **config}
    try:
        model = tvm.get_model(arch, weights=None, **kwargs)
    except Exception as exc:
        raise ModelSourceError(f"torchvision:{arch} could not be built with {kwargs}: {type(exc).__name__}: "
                               f"{exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelSourceError(f"torchvision:{arch} returned {type(model).__name__}, not a torch.nn.Module")
    return model


@contextlib.contextmanager
def _on_sys_path(directory: Path) -> Iterator[None]:
    """``directory`` first on ``sys.path`` meanwhile, as when Python runs a script (imports of neighbours)."""
    entry = str(directory)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


def _load_file(path: Path) -> ModuleType:
    """Execute ``path`` as a fresh module named after it (registered in sys.modules, as dataclasses need)."""
    if not path.is_file():
        raise ModelSourceError(f"model file not found: {path}")
    stem = re.sub(r"\W", "_", path.stem)
    module_name = f"{_USER_MODULE_PREFIX}{stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelSourceError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        with _on_sys_path(path.parent):
            spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        sys.modules.pop(module_name, None)
        raise ModelSourceError(f"cannot load model file {path}: {type(exc).__name__}: {exc}") from None
    return module


def _defined_callables(module: ModuleType) -> list[str]:
    """Public functions and classes defined in ``module`` itself (not imported into it)."""
    return sorted(k for k, v in vars(module).items()
                  if not k.startswith("_") and (inspect.isfunction(v) or inspect.isclass(v))
                  and getattr(v, "__module__", None) == module.__name__)


def _signature(factory: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins and C extensions have none
        return None


def _accepted(sig: inspect.Signature) -> str:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = [p.name for p in sig.parameters.values() if p.kind in kinds]
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        names.append("any other keyword (**kwargs)")
    return ", ".join(names) if names else "no keyword arguments"


def _build_file(path: Path, factory_name: str, num_classes: int, config: dict[str, Any]) -> nn.Module:
    from torch import nn

    module = _load_file(path)
    factory = getattr(module, factory_name, None)
    if factory is None:
        found = _defined_callables(module)
        listing = f"functions and classes defined there: {', '.join(found)}" if found else \
            "it defines no public functions or classes"
        raise ModelSourceError(f"{path} has no {factory_name!r}; {listing}")
    if not callable(factory):
        raise ModelSourceError(f"{factory_name!r} in {path} is a {type(factory).__name__}, not a function or "
                               f"class that builds the model")
    kwargs = dict(config)
    sig = _signature(factory)
    takes_classes = sig is not None and any(
        p.name == "num_classes" and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                               inspect.Parameter.KEYWORD_ONLY)
        for p in sig.parameters.values())
    if takes_classes:
        kwargs.setdefault("num_classes", num_classes)
    where = f"{factory_name} in {path}"
    if sig is not None:
        try:
            sig.bind(**kwargs)
        except TypeError as exc:
            raise ModelSourceError(
                f"{where} cannot be called with {kwargs or 'no arguments'}: {exc}. {factory_name}{sig} accepts "
                f"{_accepted(sig)}; pass them with --config KEY=VALUE") from None
    try:
        with _on_sys_path(path.parent):
            model = factory(**kwargs)
    except Exception as exc:
        if sig is None and isinstance(exc, TypeError):
            raise ModelSourceError(f"{where} cannot be called with {kwargs or 'no arguments'}: {exc}") from None
        raise ModelSourceError(f"{where} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelSourceError(f"{where} returned {type(model).__name__}, not a torch.nn.Module; it must return "
                               f"the model (or be an nn.Module class)")
    return model


def _check_logits(model: nn.Module, shape: tuple[int, ...], num_classes: int, name: str) -> None:
    """One forward pass on zeros (eval mode, no autograd, no RNG): ``(1, C, H, W)`` -> ``(1, num_classes)``."""
    import torch

    first = next(iter(model.parameters()), None)
    x = torch.zeros(1, *shape, dtype=first.dtype if first is not None and first.is_floating_point()
                    else torch.float32, device=first.device if first is not None else "cpu")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        raise ModelSourceError(f"model {name} fails on an input of shape {tuple(x.shape)} (batch 1, --input-shape "
                               f"{','.join(map(str, shape))}): {type(exc).__name__}: {exc}") from None
    finally:
        for m, training in modes:
            m.training = training
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != (1, num_classes):
        raise ModelSourceError(f"model {name} maps an input of shape {tuple(x.shape)} to {got}, but the logits "
                               f"must have shape (1, {num_classes}) for {num_classes} classes (a factory gets "
                               f"num_classes when it has a parameter of that name)")


# --------------------------------------------------------------------------- weights


def classifier_head(model: nn.Module, num_classes: int) -> str:
    """Qualified name of the head: the last module in ``named_modules()`` order with a ``weight`` whose first
    dimension is ``num_classes`` (``""``: the model itself)."""
    import torch

    heads = [n for n, m in model.named_modules()
             if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() >= 1
             and m.weight.shape[0] == num_classes]
    if not heads:
        raise ModelSourceError(f"cannot find the classifier head of {type(model).__name__}: no module has a weight "
                               f"with {num_classes} rows (the head is the last module, in named_modules() order, "
                               f"whose weight's first dimension is num_classes)")
    return heads[-1]


def load_any_weights(model: nn.Module, path: str | Path, num_classes: int) -> list[str]:
    """Load a local state_dict (``--weights``) into a model from ``build_any``; notes on what was kept.

    Every tensor must match by name and shape, except the classifier head's, which is kept fresh (and noted)
    when its shape differs: a zoo model's last block, else ``classifier_head``.
    """
    from .models import BlockChain, load_weights, load_weights_with_head

    if isinstance(model, BlockChain):
        return load_weights(model, path, num_classes)
    return load_weights_with_head(model, path, num_classes, classifier_head(model, num_classes))
