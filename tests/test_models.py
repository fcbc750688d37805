"""Model zoo: shapes, block chains, fx-traceability, torchvision key compatibility, weight loading."""

from __future__ import annotations

import json
import operator

import pytest
import torch
from torch import nn

from asyncfgd.exporter.models import (
    MODEL_NAMES,
    build_model,
    load_weights,
    model_config,
    model_spec,
)

# Small widths keep every forward pass in this file fast on CPU.
SMALL = {
    "mlp": {},
    "cnn": {},
    "resnet18": {"width": 8},
    "resnet18-imagenet": {"width": 8},
    "resnet50-imagenet": {"width": 4},
    "mobilenetv2": {"width_mult": 0.25},
}
CASES = [(name, (3, 32, 32)) for name in MODEL_NAMES] + [
    (name, (1, 8, 8)) for name in ("mlp", "cnn", "resnet18", "mobilenetv2")
]
ALLOWED_LEAVES = (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.GELU, nn.LayerNorm,
                  nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Identity)


def _build(name: str, shape: tuple[int, int, int], num_classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, num_classes, shape, **SMALL[name]).eval()


def _input(shape: tuple[int, int, int], n: int = 3) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name,shape", CASES)
def test_forward_shape_and_block_chain(name, shape):
    model = _build(name, shape)
    x = _input(shape)
    y = model(x)
    assert y.shape == (3, 10)
    assert torch.isfinite(y).all()
    z = x
    for _, block in model.blocks():
        z = block(z)
    assert torch.equal(z, y)


@pytest.mark.parametrize("name,shape", CASES)
def test_symbolic_trace_uses_only_allowed_ops(name, shape):
    model = _build(name, shape)
    gm = torch.fx.symbolic_trace(model)
    x = _input(shape)
    assert torch.equal(gm(x), model(x))
    modules = dict(model.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module":
            assert isinstance(modules[node.target], ALLOWED_LEAVES), node.target
        elif node.op in ("call_function", "call_method"):
            assert node.target in (operator.add,), node.target
    assert not any(getattr(m, "inplace", False) for m in model.modules())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_last_block_is_classifier_head(name):
    model = _build(name, (3, 32, 32))
    head_name, head = model.blocks()[-1]
    linear = head if isinstance(head, nn.Linear) else head[-1]
    assert isinstance(linear, nn.Linear) and linear.out_features == 10
    assert head_name in {"layers.3", "head", "fc", "classifier"}


def test_block_names():
    assert [n for n, _ in _build("mlp", (1, 8, 8)).blocks()] == [f"layers.{i}" for i in range(4)]
    assert [n for n, _ in _build("cnn", (1, 8, 8)).blocks()] == ["features.0", "features.1", "flatten", "head"]
    layers = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    tail = ["avgpool", "flatten", "fc"]
    assert [n for n, _ in _build("resnet18", (3, 32, 32)).blocks()] == ["conv1", "bn1", "relu", *layers, *tail]
    assert [n for n, _ in _build("resnet18-imagenet", (3, 32, 32)).blocks()] == [
        "conv1", "bn1", "relu", "maxpool", *layers, *tail]
    assert [n for n, _ in _build("mobilenetv2", (3, 32, 32)).blocks()] == [
        *(f"features.{i}" for i in range(19)), "pool", "flatten", "classifier"]


def test_mlp_and_cnn_layer_sizes():
    mlp = _build("mlp", (1, 8, 8))
    assert [(m.in_features, m.out_features) for m in mlp.modules() if isinstance(m, nn.Linear)] == [
        (64, 128), (128, 10)]
    cnn = _build("cnn", (3, 32, 32))
    assert cnn.head.in_features == 32 * 8 * 8
    assert _build("cnn", (1, 8, 8)).head.in_features == 32 * 2 * 2


# ---------------------------------------------------------------- torchvision compatibility


def _torchvision_resnet18_keys() -> list[str]:
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight", *(f"bn1.{s}" for s in bn)]
    for i in range(1, 5):
        for j in range(2):
            p = f"layer{i}.{j}"
            keys += [f"{p}.conv1.weight", *(f"{p}.bn1.{s}" for s in bn),
                     f"{p}.conv2.weight", *(f"{p}.bn2.{s}" for s in bn)]
            if i > 1 and j == 0:
                keys += [f"{p}.downsample.0.weight", *(f"{p}.downsample.1.{s}" for s in bn)]
    return keys + ["fc.weight", "fc.bias"]


def _torchvision_mobilenet_v2_keys() -> list[str]:
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]

    def cbr(p: str) -> list[str]:
        return [f"{p}.0.weight", *(f"{p}.1.{s}" for s in bn)]

    keys = cbr("features.0")
    keys += [*cbr("features.1.conv.0"), "features.1.conv.1.weight", *(f"features.1.conv.2.{s}" for s in bn)]
    for i in range(2, 18):
        p = f"features.{i}.conv"
        keys += [*cbr(f"{p}.0"), *cbr(f"{p}.1"), f"{p}.2.weight", *(f"{p}.3.{s}" for s in bn)]
    return keys + cbr("features.18") + ["classifier.1.weight", "classifier.1.bias"]


def test_resnet50_has_torchvision_resnet50s_size_and_keys():
    """torchvision.models.resnet50(): 25,557,032 parameters, 320 state_dict entries, Bottleneck key names."""
    model = build_model("resnet50-imagenet", 1000, (3, 224, 224))
    sd = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 25_557_032 and len(sd) == 320
    assert tuple(sd["layer1.0.conv3.weight"].shape) == (256, 64, 1, 1)
    assert tuple(sd["layer4.2.conv2.weight"].shape) == (512, 512, 3, 3)
    assert tuple(sd["layer4.0.downsample.0.weight"].shape) == (2048, 1024, 1, 1)
    assert tuple(sd["fc.weight"].shape) == (1000, 2048)


def test_resnet18_matches_torchvision_state_dict():
    torch.manual_seed(0)
    model = build_model("resnet18-imagenet", 1000, (3, 224, 224))
    sd = model.state_dict()
    assert len(sd) == 122
    assert list(sd) == _torchvision_resnet18_keys()
    assert sum(p.numel() for p in model.parameters()) == 11_689_512
    shapes = {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_mean": (64,),
        "bn1.num_batches_tracked": (),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer2.0.conv1.weight": (128, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.weight": (128,),
        "layer4.1.conv2.weight": (512, 512, 3, 3),
        "layer4.1.bn2.running_var": (512,),
        "fc.weight": (1000, 512),
        "fc.bias": (1000,),
    }
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    cifar = build_model("resnet18", 1000, (3, 32, 32)).state_dict()
    assert list(cifar) == list(sd)
    assert tuple(cifar["conv1.weight"].shape) == (64, 3, 3, 3)


def test_mobilenetv2_matches_torchvision_state_dict():
    torch.manual_seed(0)
    model = build_model("mobilenetv2", 1000, (3, 224, 224))
    sd = model.state_dict()
    assert len(sd) == 314
    assert list(sd) == _torchvision_mobilenet_v2_keys()
    assert sum(p.numel() for p in model.parameters()) == 3_504_872
    shapes = {
        "features.0.0.weight": (32, 3, 3, 3),
        "features.0.1.weight": (32,),
        "features.1.conv.0.0.weight": (32, 1, 3, 3),
        "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.1.conv.2.weight": (16,),
        "features.2.conv.0.0.weight": (96, 16, 1, 1),
        "features.2.conv.1.0.weight": (96, 1, 3, 3),
        "features.2.conv.2.weight": (24, 96, 1, 1),
        "features.2.conv.3.weight": (24,),
        "features.17.conv.2.weight": (320, 960, 1, 1),
        "features.18.0.weight": (1280, 320, 1, 1),
        "features.18.1.running_var": (1280,),
        "classifier.1.weight": (1000, 1280),
    }
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    assert model_config(model) == {"width_mult": 1.0, "stem_stride": 2}
    assert model.features[0][0].stride == (2, 2)


def test_mobilenetv2_small_input_uses_stride_one_stem():
    model = _build("mobilenetv2", (3, 32, 32))
    assert model_config(model) == {"width_mult": 0.25, "stem_stride": 1}
    assert model.features[0][0].stride == (1, 1)
    assert model.features[0][0].out_channels == 8 and model.classifier[1].in_features == 1280


# ---------------------------------------------------------------- config / determinism / errors


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_spec_is_json_and_rebuilds_identical_model(name):
    model = _build(name, (3, 32, 32), seed=7)
    spec = json.loads(json.dumps(model_spec(model)))
    assert spec["name"] == name and spec["num_classes"] == 10 and spec["input_shape"] == [3, 32, 32]
    torch.manual_seed(7)
    rebuilt = build_model(spec["name"], spec["num_classes"], tuple(spec["input_shape"]), **spec["config"])
    a, b = model.state_dict(), rebuilt.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_resolved_defaults():
    assert model_config(_build("mlp", (1, 8, 8))) == {"hidden": [128]}
    assert model_config(_build("cnn", (1, 8, 8))) == {"channels": [16, 32]}
    assert model_config(build_model("resnet18", 10, (3, 32, 32))) == {"width": 64}


@pytest.mark.parametrize("args,kwargs,match", [
    (("vgg", 10, (3, 32, 32)), {},
     "valid names: mlp, cnn, resnet18, resnet18-imagenet, resnet50-imagenet, mobilenetv2"),
    (("mlp", 10, (1, 8, 8)), {"width": 3}, "valid options: hidden"),
    (("mlp", 10, (1, 8, 8)), {"hidden": (0,)}, "positive int"),
    (("cnn", 10, (1, 8, 8)), {"channels": (4, 4, 4, 4)}, "shrink input"),
    (("cnn", 10, (1, 8, 8)), {"channels": ()}, "must not be empty"),
    (("resnet18", 0, (3, 32, 32)), {}, "num_classes"),
    (("resnet18", 10, (32, 32)), {}, r"\(C, H, W\)"),
    (("mobilenetv2", 10, (3, 32, 32)), {"stem_stride": 3}, "stem_stride"),
    (("mobilenetv2", 10, (3, 32, 32)), {"width_mult": -1}, "width_mult"),
])
def test_bad_arguments_raise_value_error(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model(*args, **kwargs)


# ---------------------------------------------------------------- load_weights


def test_load_imagenet_weights_into_10_class_model(tmp_path):
    torch.manual_seed(1)
    src = build_model("resnet18-imagenet", 1000, (3, 224, 224))
    for buf in src.buffers():  # make running stats distinguishable from a fresh model
        buf.add_(3)
    path = tmp_path / "resnet18.pth"
    torch.save(src.state_dict(), path)

    torch.manual_seed(2)
    dst = build_model("resnet18-imagenet", 10, (3, 224, 224))
    fresh_fc = dst.fc.weight.detach().clone()
    notes = load_weights(dst, path, num_classes=10)

    assert len(notes) == 2 and all(n.startswith("fc.") for n in notes)
    assert "(1000, 512)" in notes[0] and "(10, 512)" in notes[0]
    s, d = src.state_dict(), dst.state_dict()
    body = [k for k in d if not k.startswith("fc.")]
    assert len(body) == 120 and all(torch.equal(s[k], d[k]) for k in body)
    assert int(d["bn1.num_batches_tracked"]) == 3
    assert torch.equal(dst.fc.weight, fresh_fc)


def test_load_matching_head_and_wrapped_checkpoint(tmp_path):
    src = _build("mobilenetv2", (3, 32, 32), seed=3)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": src.state_dict(), "epoch": torch.tensor(5)}, path)
    dst = _build("mobilenetv2", (3, 32, 32), seed=4)
    assert load_weights(dst, str(path), num_classes=10) == []
    x = _input((3, 32, 32))
    assert torch.equal(dst(x), src(x))


def test_load_weights_errors(tmp_path):
    model = _build("resnet18", (3, 32, 32))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_weights(model, tmp_path / "nope.pth", 10)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="cannot read weights file"):
        load_weights(model, garbage, 10)

    other = tmp_path / "mobilenet.pth"
    torch.save(_build("mobilenetv2", (3, 32, 32)).state_dict(), other)
    with pytest.raises(ValueError,
                       match=r"missing keys \[bn1.bias, .*\(\+115 more\)\]; unexpected keys \[classifier.1.bias"):
        load_weights(model, other, 10)

    wide = tmp_path / "wide.pth"
    torch.save(build_model("resnet18", 10, (3, 32, 32), width=16).state_dict(), wide)
    with pytest.raises(ValueError, match=r"shapes differ.*conv1.weight \(16, 3, 3, 3\) vs model \(8, 3, 3, 3\)"):
        load_weights(model, wide, 10)

    with pytest.raises(ValueError, match="expected 100"):
        load_weights(model, wide, 100)
