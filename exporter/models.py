"""Model zoo: the networks the CLI can train, built by name.

Every model is a chain of top-level *blocks* (``model.blocks()``) and its ``forward`` is
literally that chain, so the splitter can cut between any two blocks and get an exact
pipeline by construction; residual blocks are single blocks and are never cut inside.
Only fx-traceable leaf modules and the ``+`` operator are used, so ``torch.fx`` can trace
every model for the ONNX exporter.

ResNet-18 and MobileNetV2 reproduce torchvision's ``state_dict`` names and shapes so that
ImageNet-pretrained torchvision weights can be loaded from a local file (``load_weights``).
Models from other sources (torchvision builders, a user's Python file) are built by
``model_sources.build_any``; ``model_spec`` works for all of them.

Initialisation is PyTorch's default per-layer init, except that ResNet-18 and MobileNetV2
use torchvision's scheme (Kaiming-normal fan-out convs, BN = 1/0, and for MobileNetV2 a
N(0, 0.01) classifier) so training from scratch behaves like torchvision. All of it draws
from the global RNG only, so a build is deterministic given ``torch.manual_seed``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

MODEL_NAMES: tuple[str, ...] = ("mlp", "cnn", "resnet18", "resnet18-imagenet", "resnet50-imagenet", "mobilenetv2")
#: attribute where ``model_sources.build_any`` stores the spec of a non-zoo model (zoo models: ``zoo_spec``)
SPEC_ATTR = "asyncfgd_spec"

InputShape = tuple[int, int, int]


class BlockChain(nn.Module):
    """Base for zoo models: ``forward`` is the composition of ``blocks()`` in order."""

    block_names: tuple[str, ...] = ()
    #: set by ``build_model`` (read back by ``model_spec``); absent on a model built directly
    zoo_spec: dict[str, Any]

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """Top-level blocks in forward order, by qualified name (the splitter's cut points)."""
        return [(name, self.get_submodule(name)) for name in self.block_names]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _, block in self.blocks():
            x = block(x)
        return x


# --------------------------------------------------------------------------- MLP / CNN


class MLP(BlockChain):
    """Flatten -> (Linear -> ReLU)* -> Linear; every layer is its own block."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)
        self.block_names = tuple(f"layers.{i}" for i in range(len(layers)))


class CNN(BlockChain):
    """(conv3x3 -> BN -> ReLU -> maxpool2)* -> Flatten -> Linear."""

    def __init__(self, input_shape: InputShape, channels: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        c, h, w = input_shape
        blocks: list[nn.Module] = []
        for out in channels:
            blocks.append(nn.Sequential(
                nn.Conv2d(c, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ))
            c, h, w = out, h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(
                f"cnn: {len(channels)} pooling blocks shrink input {input_shape} to nothing; "
                "use fewer channels entries or a larger input")
        self.features = nn.Sequential(*blocks)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(c * h * w, num_classes)
        self.block_names = (*(f"features.{i}" for i in range(len(blocks))), "flatten", "head")


# --------------------------------------------------------------------------- ResNet-18


def _init_torchvision(model: nn.Module) -> None:
    """torchvision's ResNet/MobileNet init: Kaiming fan-out convs, BN weight 1 / bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock (same attribute names, hence same state_dict keys).

    torchvision reuses one ``relu`` module twice; two separate ReLUs are used here so each
    fx node has its own module (ReLU has no state, so the keys are unchanged).
    """

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet-50 Bottleneck (1x1 reduce, 3x3 with the stride, 1x1 expand by 4; same key names),
    with one ReLU module per use as in ``BasicBlock``."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu3 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


#: depth -> (block, blocks per stage), as torchvision's resnet18 and resnet50
RESNET_DEPTHS: dict[int, tuple[type[nn.Module], tuple[int, ...]]] = {18: (BasicBlock, (2, 2, 2, 2)),
                                                                     50: (Bottleneck, (3, 4, 6, 3))}


class ResNet(BlockChain):
    """ResNet-18 or -50 with torchvision key names; ``imagenet`` picks the 7x7/2 stem + maxpool.

    The CIFAR variant (3x3/1 stem, no maxpool) keeps 32x32 inputs at full resolution in
    layer1; its keys equal torchvision's but ``conv1.weight`` is 3x3 instead of 7x7.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int, imagenet: bool, depth: int = 18) -> None:
        super().__init__()
        block, counts = RESNET_DEPTHS[depth]
        expansion = getattr(block, "expansion", 1)
        if imagenet:
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        stem = ["conv1", "bn1", "relu"]
        if imagenet:
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            stem.append("maxpool")
        inplanes = width
        for i, (planes, count) in enumerate(zip((width, 2 * width, 4 * width, 8 * width), counts, strict=True),
                                            start=1):
            stride = 1 if i == 1 else 2
            blocks = [block(inplanes, planes, stride)]
            blocks += [block(planes * expansion, planes, 1) for _ in range(count - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            inplanes = planes * expansion
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(inplanes, num_classes)
        self.block_names = (
            *stem,
            *(f"layer{i}.{j}" for i, count in enumerate(counts, start=1) for j in range(count)),
            "avgpool", "flatten", "fc",
        )
        _init_torchvision(self)


# --------------------------------------------------------------------------- MobileNetV2


def _make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's channel rounding (multiple of 8, never more than 10% below ``v``)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _conv_bn_relu6(inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: keys ``0.weight`` (conv) and ``1.*`` (BN)."""
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel, stride=stride, padding=(kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [expand 1x1] -> depthwise 3x3 -> project 1x1 (+ input if shapes match)."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(inp, hidden, kernel=1))
        layers += [
            _conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


# (expand ratio t, output channels c, repeats n, first stride s), as in the paper / torchvision.
_MBV2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                  (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(BlockChain):
    """MobileNetV2 with torchvision key names (``features.0..18``, ``classifier.1``)."""

    def __init__(self, in_channels: int, num_classes: int, width_mult: float, stem_stride: int) -> None:
        super().__init__()
        inp = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [_conv_bn_relu6(in_channels, inp, stride=stem_stride)]
        for t, c, n, s in _MBV2_SETTINGS:
            oup = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(inp, oup, s if i == 0 else 1, t))
                inp = oup
        features.append(_conv_bn_relu6(inp, last, kernel=1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))
        self.block_names = (*(f"features.{i}" for i in range(len(features))),
                            "pool", "flatten", "classifier")
        _init_torchvision(self)
        head = cast(nn.Linear, self.classifier[1])
        nn.init.normal_(head.weight, 0.0, 0.01)
        nn.init.zeros_(head.bias)


# --------------------------------------------------------------------------- config + registry


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _int_tuple(name: str, value: Any, allow_empty: bool) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
        raise ValueError(f"{name} must be a tuple/list of positive ints, got {value!r}")
    if not value and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    return tuple(_positive_int(f"{name}[{i}]", v) for i, v in enumerate(value))


def _build_mlp(num_classes: int, shape: InputShape, hidden: Any = (128,)) -> tuple[BlockChain, dict]:
    hidden = _int_tuple("hidden", hidden, allow_empty=True)
    return MLP(shape[0] * shape[1] * shape[2], hidden, num_classes), {"hidden": list(hidden)}


def _build_cnn(num_classes: int, shape: InputShape, channels: Any = (16, 32)) -> tuple[BlockChain, dict]:
    channels = _int_tuple("channels", channels, allow_empty=False)
    return CNN(shape, channels, num_classes), {"channels": list(channels)}


def _resnet_builder(imagenet: bool, depth: int = 18) -> Callable[..., tuple[BlockChain, dict]]:
    def build(num_classes: int, shape: InputShape, width: Any = 64) -> tuple[BlockChain, dict]:
        width = _positive_int("width", width)
        return ResNet(shape[0], num_classes, width, imagenet, depth), {"width": width}
    return build


def _build_mobilenetv2(num_classes: int, shape: InputShape, width_mult: Any = 1.0,
                       stem_stride: Any = None) -> tuple[BlockChain, dict]:
    if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or width_mult <= 0:
        raise ValueError(f"width_mult must be a positive number, got {width_mult!r}")
    if stem_stride is None:
        # torchvision's stride-2 stem downsamples 32x in total, leaving a 32x32 (CIFAR) image
        # at 1x1 already before the last stages; small inputs keep the stem at stride 1
        # (the usual CIFAR adaptation, final map 2x2). Shapes, hence weights, are unchanged.
        stem_stride = 1 if min(shape[1], shape[2]) < 64 else 2
    if stem_stride not in (1, 2) or isinstance(stem_stride, bool):
        raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride!r}")
    model = MobileNetV2(shape[0], num_classes, float(width_mult), stem_stride)
    return model, {"width_mult": float(width_mult), "stem_stride": stem_stride}


_BUILDERS: dict[str, Callable[..., tuple[BlockChain, dict]]] = {
    "mlp": _build_mlp,
    "cnn": _build_cnn,
    "resnet18": _resnet_builder(imagenet=False),
    "resnet18-imagenet": _resnet_builder(imagenet=True),
    "resnet50-imagenet": _resnet_builder(imagenet=True, depth=50),
    "mobilenetv2": _build_mobilenetv2,
}
_OPTIONS: dict[str, tuple[str, ...]] = {
    "mlp": ("hidden",),
    "cnn": ("channels",),
    "resnet18": ("width",),
    "resnet18-imagenet": ("width",),
    "resnet50-imagenet": ("width",),
    "mobilenetv2": ("width_mult", "stem_stride"),
}


def build_model(name: str, num_classes: int, input_shape: tuple[int, int, int], **config: Any) -> BlockChain:
    """Build zoo model ``name`` for (C, H, W) inputs; ``config`` holds the model's options.

    The resolved spec is stored on the model so ``model_spec``/``model_config`` can rebuild it.
    """
    if name not in _BUILDERS:
        if ":" in name:  # torchvision:NAME or PATH.py:FACTORY
            raise ValueError(f"model {name!r} is not a zoo model: build_model takes only {', '.join(MODEL_NAMES)}; "
                             f"asyncfgd.exporter.model_sources.build_any builds every source")
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)} (other sources: "
                         f"torchvision:NAME, or PATH.py:FACTORY for a model defined in your own file)")
    unknown = sorted(set(config) - set(_OPTIONS[name]))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for model {name!r}; "
                         f"valid options: {', '.join(_OPTIONS[name])}")
    num_classes = _positive_int("num_classes", num_classes)
    shape = _int_tuple("input_shape", input_shape, allow_empty=False)
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {input_shape!r}")
    model, resolved = _BUILDERS[name](num_classes, shape, **config)
    model.zoo_spec = {"name": name, "num_classes": num_classes,
                      "input_shape": list(shape), "config": resolved}
    return model


def model_spec(model: nn.Module) -> dict[str, Any]:
    """JSON-serialisable ``{name, num_classes, input_shape, config}`` of a model built by ``build_model``
    (a zoo model) or ``model_sources.build_any`` (any source); ``build_any(**model_spec(m))`` rebuilds ``m``.
    """
    spec = getattr(model, SPEC_ATTR, None) or getattr(model, "zoo_spec", None)
    if spec is None:
        raise ValueError("model was not built by asyncfgd.exporter.models.build_model "
                         "or asyncfgd.exporter.model_sources.build_any")
    return {**spec, "input_shape": list(spec["input_shape"]), "config": dict(spec["config"])}


def model_config(model: nn.Module) -> dict[str, Any]:
    """Resolved config: ``build_model(name, num_classes, input_shape, **model_config(m))`` rebuilds zoo model
    ``m`` (any source: ``build_any(name, num_classes, input_shape, model_config(m))``)."""
    return model_spec(model)["config"]


# --------------------------------------------------------------------------- pretrained weights


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt / non-torch files
        raise ValueError(f"cannot read weights file {path}: {exc}") from exc
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return dict(obj)


def _few(keys: list[str], n: int = 5) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_weights(model: BlockChain, path: str | Path, num_classes: int) -> list[str]:
    """Load a local torchvision-format state_dict into ``model``; return notes on what was kept.

    The classifier head (the last block) is loaded only if its shapes match; otherwise (e.g. a
    1000-class ImageNet checkpoint into a 10-class model) the fresh head is kept and noted.
    Any other missing, unexpected or mis-shaped tensor is an error, so a wrong checkpoint
    can never be half-loaded silently.
    """
    return load_weights_with_head(model, path, num_classes, model.blocks()[-1][0])


def load_weights_with_head(model: nn.Module, path: str | Path, num_classes: int, head: str) -> list[str]:
    """``load_weights`` for any ``nn.Module`` whose classifier head is the submodule named ``head``.

    Every tensor outside ``head`` (qualified name ``head.*``; ``""`` means the whole model) must be in
    the checkpoint with the model's shape; the head's tensors are loaded only if all of them fit.
    """
    path = Path(path)
    state = _read_state_dict(path)
    own = model.state_dict()

    def is_head(key: str) -> bool:
        return key.startswith(head + ".") if head else True

    out_features = [t.shape[0] for k, t in own.items() if is_head(k) and k.endswith("weight")]
    if out_features[-1:] != [num_classes]:
        raise ValueError(f"model head {head!r} has {out_features[-1:]} outputs, expected {num_classes}")
    missing = sorted(k for k in own if k not in state and not is_head(k))
    unexpected = sorted(k for k in state if k not in own and not is_head(k))
    if missing or unexpected:
        raise ValueError(f"{path} does not match the model: "
                         f"missing keys [{_few(missing)}]; unexpected keys [{_few(unexpected)}]")
    bad = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
           for k in own if not is_head(k) and state[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"{path}: tensor shapes differ from the model: {_few(bad, 3)}")

    head_keys = [k for k in own if is_head(k)]
    head_fits = all(k in state and state[k].shape == own[k].shape for k in head_keys)
    notes: list[str] = []
    if not head_fits:
        for k in head_keys:
            found = tuple(state[k].shape) if k in state else "absent"
            notes.append(f"{k}: checkpoint {found} vs model {tuple(own[k].shape)}; "
                         f"kept the freshly initialised {num_classes}-class head")
        state = {k: v for k, v in state.items() if not is_head(k)}
        state.update({k: own[k] for k in head_keys})
    model.load_state_dict({k: state[k] for k in own}, strict=True)
    return notes
