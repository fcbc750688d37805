"""Tiny, self-written model fixtures in the style of common vision architectures.

Each fixture imitates the *op patterns* of a well-known architecture (torchvision / timm / PyTorch
tutorials) at a toy size, so the forward-mode exporter can be tested on the shapes of code that real
models are written in, without the cost of the real models. None of the code is copied; every class
is written here from the description of its architecture.

Rules every fixture follows (the exporter relies on them):

* the input is batch-first and the output is logits of shape ``(B, 10)``;
* the forward is traceable by ``torch.fx`` (no Python control flow on tensor values or shapes; shape
  arithmetic only through ``x.size(...)`` / ``x.shape``, so no batch size is baked into the graph).
  ``DropPath`` and ``nn.TransformerEncoderLayer`` are meant to be kept as fx leaf modules;
* the batch stays at dim 0 in every intermediate tensor (attention reshapes to ``(B, L, heads, d)``
  and transposes dims 1 and 2; nothing folds the batch together with another dim);
* the models are tiny (8-32 channels, a few blocks), so a forward at batch 4 takes milliseconds.

``FIXTURES`` maps a name to ``(factory, per-sample input shape)``; each factory seeds the RNG with
``torch.manual_seed(0)`` before building, so two builds give identical weights. The seeding runs
inside ``torch.random.fork_rng`` so building a fixture leaves the caller's global RNG state alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FIXTURES",
    "FIXTURE_NAMES",
    "DropPath",
    "drop_path",
    "channel_shuffle",
]

NUM_CLASSES = 10


# ---------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Stochastic depth per sample: zero whole samples with probability ``drop_prob``.

    The mask has shape ``(B, 1, 1, ...)`` (Bernoulli(keep)), and the kept samples are scaled by
    ``1 / keep`` so the expectation is unchanged. ``torch.rand``-style factories cannot take fx
    proxies, so this function is registered with ``torch.fx.wrap`` below: fx records a single
    ``call_function`` node for it instead of tracing into it.
    """
    keep = 1.0 - drop_prob
    mask_shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    mask = torch.empty(mask_shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep


# Module top level, as torchvision does for ``stochastic_depth``: calls to ``drop_path`` from this
# module's code become leaf ``call_function`` nodes under symbolic tracing.
torch.fx.wrap("drop_path")


class DropPath(nn.Module):
    """Drop-path (stochastic depth) on a residual branch, timm / torchvision style.

    Identity in eval mode or when ``drop_prob == 0``; otherwise calls the fx-wrapped ``drop_path``.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob: float = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        return drop_path(x, self.drop_prob)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet channel shuffle: (B, g, C/g, H, W) -> swap dims 1, 2 -> (B, C, H, W)."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    x = x.view(batchsize, -1, height, width)
    return x


# ---------------------------------------------------------------------------------------------------
# 1. tutorial_net
# ---------------------------------------------------------------------------------------------------


class TutorialNet(nn.Module):
    """The PyTorch CIFAR-10 tutorial network.

    Exercises: ``F.relu`` / ``F.max_pool2d`` functional calls, ``torch.flatten(x, 1)``, a plain
    Linear stack (400 -> 120 -> 84 -> 10).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


# ---------------------------------------------------------------------------------------------------
# 2. view_net
# ---------------------------------------------------------------------------------------------------


class ViewNet(nn.Module):
    """A small LeNet/AlexNet-era conv net that flattens with ``x.view(x.size(0), -1)``.

    Exercises: ``x.size(0)`` shape arithmetic feeding ``view``, nn.ReLU / nn.MaxPool2d modules,
    padded convs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 16x16
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(16, 16, 3, stride=2, padding=1),  # 4x4
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(16 * 4 * 4, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = x.view(x.size(0), -1)
        return self.classifier(x)


# ---------------------------------------------------------------------------------------------------
# 3. mobilenet_v3_small
# ---------------------------------------------------------------------------------------------------


class SqueezeExcite(nn.Module):
    """Squeeze-excite gate: avgpool -> 1x1 conv -> act -> 1x1 conv -> gate, then ``x * scale``.

    MobileNetV3 uses ReLU / Hardsigmoid; EfficientNet uses SiLU / Sigmoid.
    """

    def __init__(
        self,
        channels: int,
        squeeze: int,
        activation: Callable[[], nn.Module] = nn.ReLU,
        gate: Callable[[], nn.Module] = nn.Hardsigmoid,
    ) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.act = activation()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.avgpool(x)
        scale = self.act(self.fc1(scale))
        scale = self.gate(self.fc2(scale))
        return x * scale


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> optional activation, torchvision ``Conv2dNormActivation`` style."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        activation: Callable[[], nn.Module] | None = nn.ReLU,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if activation is not None:
            layers.append(activation())
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV3 inverted residual: expand 1x1 -> depthwise kxk -> [SE] -> project 1x1 (linear).

    The residual ``+`` is used only when stride is 1 and the channels match (decided at build time).
    """

    def __init__(
        self,
        cin: int,
        expanded: int,
        cout: int,
        kernel: int,
        stride: int,
        use_se: bool,
        activation: Callable[[], nn.Module],
    ) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(ConvBNAct(cin, expanded, 1, activation=activation))
        layers.append(ConvBNAct(expanded, expanded, kernel, stride, groups=expanded, activation=activation))
        if use_se:
            layers.append(SqueezeExcite(expanded, max(8, expanded // 4)))
        layers.append(ConvBNAct(expanded, cout, 1, activation=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.use_res_connect:
            out = out + x
        return out


class MobileNetV3Small(nn.Module):
    """A reduced MobileNetV3-small.

    Exercises: conv-BN-Hardswish stem (stride 2), depthwise convs, squeeze-excite with Hardsigmoid
    and ``x * scale``, ReLU and Hardswish, residual ``+``, AdaptiveAvgPool2d(1) + flatten, a
    Linear -> Hardswish -> Dropout(0.2) -> Linear classifier.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            ConvBNAct(3, 16, 3, stride=2, activation=nn.Hardswish),  # 16x16
            # depthwise with SE, no expansion, stride 2 (like the first MobileNetV3-small block)
            InvertedResidual(16, 16, 16, 3, 2, use_se=True, activation=nn.ReLU),  # 8x8
            InvertedResidual(16, 32, 16, 3, 1, use_se=False, activation=nn.ReLU),  # residual
            InvertedResidual(16, 32, 24, 5, 1, use_se=True, activation=nn.Hardswish),
        )
        self.lastconv = ConvBNAct(24, 32, 1, activation=nn.Hardswish)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(32, 32),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=0.2, inplace=True),
            nn.Linear(32, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lastconv(self.features(x))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# ---------------------------------------------------------------------------------------------------
# 4. efficientnet_b0
# ---------------------------------------------------------------------------------------------------


class MBConv(nn.Module):
    """EfficientNet MBConv: expand 1x1 -> depthwise 3x3 -> SE (SiLU / Sigmoid) -> project 1x1 + BN.

    The residual branch goes through ``DropPath`` (stochastic depth) when stride is 1 and the
    channels match.
    """

    def __init__(self, cin: int, cout: int, expand_ratio: int, stride: int, drop_prob: float) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        expanded = cin * expand_ratio
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(ConvBNAct(cin, expanded, 1, activation=nn.SiLU))
        layers.append(ConvBNAct(expanded, expanded, 3, stride, groups=expanded, activation=nn.SiLU))
        layers.append(SqueezeExcite(expanded, max(1, cin // 4), activation=nn.SiLU, gate=nn.Sigmoid))
        layers.append(ConvBNAct(expanded, cout, 1, activation=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = DropPath(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.use_res_connect:
            out = self.stochastic_depth(out)
            out = out + x
        return out


class EfficientNetB0(nn.Module):
    """A reduced EfficientNet-B0.

    Exercises: SiLU everywhere, MBConv with SE (Sigmoid gate, multiplication), ``DropPath`` on the
    residual branch (an fx-wrapped function in training mode), 1x1 head conv + SiLU, avgpool,
    Dropout, Linear.
    """

    def __init__(self, drop_prob: float = 0.1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            ConvBNAct(3, 16, 3, stride=2, activation=nn.SiLU),  # 16x16
            MBConv(16, 16, expand_ratio=1, stride=1, drop_prob=drop_prob),  # residual, no expansion
            MBConv(16, 24, expand_ratio=2, stride=2, drop_prob=drop_prob),  # 8x8
            MBConv(24, 24, expand_ratio=2, stride=1, drop_prob=drop_prob),  # residual
            ConvBNAct(24, 32, 1, activation=nn.SiLU),  # head conv
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=0.2, inplace=True), nn.Linear(32, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# ---------------------------------------------------------------------------------------------------
# 5. convnext_block_net
# ---------------------------------------------------------------------------------------------------


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dim of an NCHW tensor, written out as in the ConvNeXt reference.

    Exercises: ``mean(1, keepdim=True)``, ``pow``, ``sqrt``, broadcasting of ``weight[:, None, None]``.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: dw 7x7 -> permute to NHWC -> LayerNorm -> Linear 4x -> GELU -> Linear -> layer
    scale ``gamma * x`` -> permute back -> DropPath -> residual add."""

    def __init__(self, dim: int, layer_scale: float = 1e-1, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))
        self.drop_path = DropPath(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)
        x = self.norm(x)
        x = self.pwconv1(x)
        x = self.act(x)
        x = self.pwconv2(x)
        x = self.gamma * x
        x = x.permute(0, 3, 1, 2)  # back to (B, C, H, W)
        return shortcut + self.drop_path(x)


class ConvNeXtBlockNet(nn.Module):
    """A one-stage ConvNeXt.

    Exercises: 4x4/stride-4 patchify stem, channels-first LayerNorm, depthwise 7x7, NCHW <-> NHWC
    permutes, Linear on a 4-D tensor, GELU, layer-scale parameter, ``x.mean([-2, -1])``, LayerNorm
    head.
    """

    def __init__(self, dim: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, kernel_size=4, stride=4), LayerNorm2d(dim, eps=1e-6))  # 8x8
        self.stages = nn.Sequential(*[ConvNeXtBlock(dim, layer_scale=1e-1, drop_prob=0.0) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        x = x.mean([-2, -1])  # global average pool -> (B, C)
        return self.head(self.norm(x))


# ---------------------------------------------------------------------------------------------------
# 6. densenet_block_net
# ---------------------------------------------------------------------------------------------------


class DenseLayer(nn.Module):
    """DenseNet-BC layer: BN -> ReLU -> conv1x1 (bottleneck) -> BN -> ReLU -> conv3x3 (growth)."""

    def __init__(self, cin: int, growth: int, bn_size: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.ModuleDict):
    """Dense block: every layer sees the concatenation of all earlier feature maps."""

    def __init__(self, num_layers: int, cin: int, growth: int) -> None:
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(cin + i * growth, growth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """DenseNet transition: BN -> ReLU -> 1x1 conv -> AvgPool2d(2)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.BatchNorm2d(cin),
            nn.ReLU(inplace=True),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.AvgPool2d(kernel_size=2, stride=2),
        )


class DenseNetBlockNet(nn.Module):
    """One DenseNet block + transition.

    Exercises: ``torch.cat`` of a growing Python list of features, BN -> ReLU pre-activation,
    AvgPool2d, final BN -> ReLU, AdaptiveAvgPool2d + ``torch.flatten(x, 1)``.
    """

    def __init__(self, stem: int = 16, growth: int = 8, num_layers: int = 3) -> None:
        super().__init__()
        block_out = stem + num_layers * growth  # 40
        self.features = nn.Sequential(
            nn.Conv2d(3, stem, 3, stride=2, padding=1, bias=False),  # 16x16
            DenseBlock(num_layers, stem, growth),
            Transition(block_out, block_out // 2),  # 8x8
            nn.BatchNorm2d(block_out // 2),
        )
        self.classifier = nn.Linear(block_out // 2, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.features(x), inplace=True)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


# ---------------------------------------------------------------------------------------------------
# 7. shufflenet_unit_net
# ---------------------------------------------------------------------------------------------------


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit.

    Stride 1: ``x.chunk(2, dim=1)``, the right half goes through the branch, ``torch.cat`` with the
    untouched left half. Stride 2: both branches see the whole input (left: dw 3x3 + 1x1). Both end
    with ``channel_shuffle(out, 2)``.
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        branch_features = cout // 2
        if stride == 1:
            assert cin == cout, "a stride-1 unit keeps the channel count"
            self.branch1 = nn.Sequential()
            branch2_in = branch_features
        else:
            self.branch1 = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                nn.BatchNorm2d(cin),
                nn.Conv2d(cin, branch_features, 1, bias=False),
                nn.BatchNorm2d(branch_features),
                nn.ReLU(inplace=True),
            )
            branch2_in = cin
        self.branch2 = nn.Sequential(
            nn.Conv2d(branch2_in, branch_features, 1, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
            nn.Conv2d(branch_features, branch_features, 3, stride, 1, groups=branch_features, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.Conv2d(branch_features, branch_features, 1, bias=False),
            nn.BatchNorm2d(branch_features),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetUnitNet(nn.Module):
    """A reduced ShuffleNetV2.

    Exercises: ``chunk`` into two outputs, ``torch.cat`` of a tuple, the 5-D view / transpose /
    ``contiguous`` / view channel shuffle (with ``x.size()`` unpacked into four values), depthwise
    convs, stride-2 two-branch unit, ``x.mean([2, 3])``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1, bias=False),  # 16x16
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
        )
        self.stage = nn.Sequential(
            ShuffleUnit(16, 32, stride=2),  # 8x8
            ShuffleUnit(32, 32, stride=1),
            ShuffleUnit(32, 32, stride=1),
        )
        self.fc = nn.Linear(32, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage(self.conv1(x))
        x = x.mean([2, 3])
        return self.fc(x)


# ---------------------------------------------------------------------------------------------------
# 8. vit_tiny / 9. vit_handwritten
# ---------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """ViT patch embedding + class token + position embedding.

    conv (kernel = stride = patch) -> ``flatten(2).transpose(1, 2)`` -> prepend the class token
    (``expand(x.shape[0], -1, -1)`` + ``torch.cat``) -> add position embedding -> Dropout.
    """

    def __init__(self, dim: int = 32, patch: int = 8, image: int = 32, dropout: float = 0.1) -> None:
        super().__init__()
        num_patches = (image // patch) ** 2
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, 4, 4)
        x = x.flatten(2).transpose(1, 2)  # (B, 16, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat((cls, x), dim=1)  # (B, 17, D)
        x = x + self.pos_embed
        return self.pos_drop(x)


class ViTTiny(nn.Module):
    """A two-layer ViT built from ``nn.TransformerEncoderLayer`` (pre-norm, GELU, batch_first).

    Exercises: patch embedding / cls token / position embedding, library encoder layers (meant to be
    fx leaves), a Python loop over an ``nn.ModuleList``, final LayerNorm, ``x[:, 0]`` indexing.
    """

    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = PatchEmbed(dim)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model=dim,
                nhead=heads,
                dim_feedforward=2 * dim,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return self.head(x[:, 0])


class Attention(nn.Module):
    """Hand-written multi-head self-attention, timm style, batch kept at dim 0 throughout.

    ``qkv`` Linear -> ``chunk(3, dim=-1)`` -> (B, L, heads, d).transpose(1, 2) -> either explicit
    ``softmax(q @ k^T * scale) @ v`` or ``F.scaled_dot_product_attention`` -> transpose back ->
    reshape (B, L, D) -> proj.
    """

    def __init__(self, dim: int, heads: int, use_sdpa: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.use_sdpa = use_sdpa
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x)
        q, k, v = qkv.chunk(3, dim=-1)
        q = q.reshape(B, L, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, L, d)
        k = k.reshape(B, L, self.heads, self.head_dim).transpose(1, 2)
        v = v.reshape(B, L, self.heads, self.head_dim).transpose(1, 2)
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            attn = attn.softmax(dim=-1)
            out = attn @ v
        out = out.transpose(1, 2).reshape(B, L, D)
        return self.proj(out)


class Mlp(nn.Module):
    """Transformer MLP: Linear -> GELU (tanh approximation) -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2, use_sdpa: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, use_sdpa=use_sdpa)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class ViTHandwritten(nn.Module):
    """A two-block ViT with hand-written attention (timm ``VisionTransformer`` style).

    Block 1 uses explicit ``softmax(q @ k^T * scale) @ v``; block 2 uses
    ``F.scaled_dot_product_attention``. Exercises: ``x.shape`` unpacking, ``chunk``, 4-D reshape /
    transpose, batched matmul, softmax, SDPA, tanh GELU, residuals, ``x[:, 0]``.
    """

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.embed = PatchEmbed(dim)
        self.blocks = nn.Sequential(
            Block(dim, heads, use_sdpa=False),
            Block(dim, heads, use_sdpa=True),
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.embed(x))
        x = self.norm(x)
        return self.head(x[:, 0])


# ---------------------------------------------------------------------------------------------------
# 10. mlp_bn1d
# ---------------------------------------------------------------------------------------------------


class MlpBN1d(nn.Module):
    """A plain MLP with BatchNorm1d and classic saturating activations (input (3, 8, 8)).

    Exercises: ``x.flatten(1)``, BatchNorm1d on (B, F), Tanh, Sigmoid, LeakyReLU(0.1).
    """

    def __init__(self, in_features: int = 3 * 8 * 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 32)
        self.bn1 = nn.BatchNorm1d(32)
        self.act1 = nn.Tanh()
        self.fc2 = nn.Linear(32, 32)
        self.bn2 = nn.BatchNorm1d(32)
        self.act2 = nn.Sigmoid()
        self.fc3 = nn.Linear(32, 16)
        self.act3 = nn.LeakyReLU(0.1)
        self.fc4 = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        x = self.act1(self.bn1(self.fc1(x)))
        x = self.act2(self.bn2(self.fc2(x)))
        x = self.act3(self.fc3(x))
        return self.fc4(x)


# ---------------------------------------------------------------------------------------------------
# 11. conv1d_net
# ---------------------------------------------------------------------------------------------------


class Conv1dNet(nn.Module):
    """A 1-D conv net over (C, L) = (4, 64) sequences (audio / time-series style).

    Exercises: Conv1d with ``padding="same"``, stride 2, grouped + dilated ``padding="valid"``;
    BatchNorm1d on (B, C, L), ELU, GELU, ``x.mean(-1)``. Lengths: 64 -> 64 -> 32 -> 28.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 8, 5, padding="same")
        self.bn1 = nn.BatchNorm1d(8)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv1d(8, 16, 3, stride=2, dilation=1, padding=1)
        self.act2 = nn.ELU()
        self.conv3 = nn.Conv1d(16, 16, 3, groups=4, padding="valid", dilation=2)
        self.act3 = nn.GELU()
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.conv2(x))
        x = self.act3(self.conv3(x))
        x = x.mean(-1)
        return self.fc(x)


# ---------------------------------------------------------------------------------------------------
# 12. gn_mish_net
# ---------------------------------------------------------------------------------------------------


class GNMishNet(nn.Module):
    """A small conv net with less common normalisation, activation, pooling and resampling ops.

    Exercises: GroupNorm(4, 16), Mish, Softplus, ReLU6, MaxPool2d(3, stride=2, padding=1),
    AvgPool2d, nearest Upsample x2, ``torch.stack(..., dim=1).amax(dim=1)`` (element-wise max of two
    maps with the batch kept at dim 0), AdaptiveAvgPool2d((2, 2)), flatten, Linear.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.gn1 = nn.GroupNorm(4, 16)
        self.act1 = nn.Mish()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)  # 32 -> 16
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.act2 = nn.Softplus()
        self.avgpool = nn.AvgPool2d(2)  # 16 -> 8
        self.up = nn.Upsample(scale_factor=2, mode="nearest")  # 8 -> 16
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.gn3 = nn.GroupNorm(4, 16)
        self.act3 = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d((2, 2))
        self.fc = nn.Linear(16 * 2 * 2, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.gn1(self.conv1(x))))  # (B, 16, 16, 16)
        skip = x
        x = self.avgpool(self.act2(self.conv2(x)))  # (B, 16, 8, 8)
        x = self.up(x)  # (B, 16, 16, 16)
        x = torch.stack([x, skip], dim=1).amax(dim=1)
        x = self.act3(self.gn3(self.conv3(x)))
        x = self.pool(x)  # (B, 16, 2, 2)
        x = torch.flatten(x, 1)
        return self.fc(x)


# ---------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------


def _seeded(cls: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """A factory that builds ``cls()`` right after ``torch.manual_seed(0)`` (global RNG restored after)."""

    def factory() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return cls()

    factory.__name__ = f"build_{getattr(cls, '__name__', 'model')}"
    factory.__qualname__ = factory.__name__
    return factory


IMAGE_SHAPE: tuple[int, ...] = (3, 32, 32)

FIXTURES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "tutorial_net": (_seeded(TutorialNet), IMAGE_SHAPE),
    "view_net": (_seeded(ViewNet), IMAGE_SHAPE),
    "mobilenet_v3_small": (_seeded(MobileNetV3Small), IMAGE_SHAPE),
    "efficientnet_b0": (_seeded(EfficientNetB0), IMAGE_SHAPE),
    "convnext_block_net": (_seeded(ConvNeXtBlockNet), IMAGE_SHAPE),
    "densenet_block_net": (_seeded(DenseNetBlockNet), IMAGE_SHAPE),
    "shufflenet_unit_net": (_seeded(ShuffleNetUnitNet), IMAGE_SHAPE),
    "vit_tiny": (_seeded(ViTTiny), IMAGE_SHAPE),
    "vit_handwritten": (_seeded(ViTHandwritten), IMAGE_SHAPE),
    "mlp_bn1d": (_seeded(MlpBN1d), (3, 8, 8)),
    "conv1d_net": (_seeded(Conv1dNet), (4, 64)),
    "gn_mish_net": (_seeded(GNMishNet), IMAGE_SHAPE),
}

FIXTURE_NAMES: tuple[str, ...] = tuple(FIXTURES)
