"""Model sources (`--model NAME | torchvision:NAME | PATH.py:FACTORY`): building, specs, weights, CLI errors."""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from asyncfgd.app.cli import app
from asyncfgd.app.training import checkpoint
from asyncfgd.app.training.artifact_cache import ExportOptions
from asyncfgd.app.training.bp import build_from_spec
from asyncfgd.exporter.model_sources import (
    ModelSourceError,
    build_any,
    classifier_head,
    load_any_weights,
    parse_source,
    short_name,
    source_key,
)
from asyncfgd.exporter.models import model_config, model_spec

SHAPE = (1, 4, 4)  # 16 inputs

# Only nn.Flatten / nn.Linear / nn.ReLU, so the one export test below does not depend on the tracer's
# coverage of functional calls.
USER_FILE = '''
import torch
from torch import nn

LIMIT = 3  # not callable: must not be listed


def make(num_classes, hidden=8, tag="plain"):
    """Function factory; records its arguments on the model."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    model.received = {"num_classes": num_classes, "hidden": hidden, "tag": tag}
    return model


class Net(nn.Module):
    """Class factory with a keyword-only option."""

    def __init__(self, num_classes: int, *, width: int = 4) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.body = nn.Linear(16, width)
        self.act = nn.ReLU()
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.act(self.body(self.flatten(x))))


def fixed():
    """No num_classes parameter: always 3 classes."""
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))


def needs_depth(depth, num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(16, num_classes))


def broken(num_classes):
    raise ValueError("depth must be even, got 3")


def not_a_model(num_classes):
    return {"layers": num_classes}


def wrong_input(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(99, num_classes))
'''


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "net.py"
    path.write_text(textwrap.dedent(USER_FILE))
    return path


def _msg(exc_info: pytest.ExceptionInfo) -> str:
    return " ".join(str(exc_info.value).split())


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize("model,kind,name", [
    ("cnn", "zoo", "cnn"),
    ("resnet18-imagenet", "zoo", "resnet18-imagenet"),
    ("torchvision:resnet18", "torchvision", "resnet18"),
    ("models/net.py:make", "file", "make"),
    ("C:\\models\\net.py:Net", "file", "Net"),
])
def test_parse_source_forms(model, kind, name):
    src = parse_source(model)
    assert (src.kind, src.name) == (kind, name)
    if kind == "file":
        assert src.path is not None and src.path.is_absolute() and src.path.name.endswith("net.py")


@pytest.mark.parametrize("model,message", [
    ("net.py", "as net.py:FACTORY"),
    ("net.py:", "name of the function or class"),
    ("net.py:1bad", "name of the function or class"),
    ("torchvision:", "name the torchvision model"),
    ("timm:resnet18", "unknown model source 'timm'"),
    ("models/net.txt:make", "must be a Python file (.py)"),
])
def test_parse_source_errors(model, message):
    with pytest.raises(ModelSourceError) as exc:
        parse_source(model)
    assert message in _msg(exc)


def test_short_names_are_file_name_safe(tmp_path):
    assert short_name("cnn") == "cnn"
    assert short_name("torchvision:resnet18") == "torchvision-resnet18"
    assert short_name(f"{tmp_path}/my net.py:make") == "my-net-make"


# ---------------------------------------------------------------- building from a file


def test_function_factory_gets_num_classes_and_config(user_file):
    model = build_any(f"{user_file}:make", 3, SHAPE, {"hidden": 5, "tag": "custom"})
    assert isinstance(model, nn.Sequential)
    assert model.received == {"num_classes": 3, "hidden": 5, "tag": "custom"}
    assert model(torch.zeros(2, *SHAPE)).shape == (2, 3)
    assert model.training  # the output check runs in eval mode and restores the mode


def test_class_factory_and_relative_path(user_file, monkeypatch):
    monkeypatch.chdir(user_file.parent)
    model = build_any("net.py:Net", 4, SHAPE, {"width": 6})
    assert type(model).__name__ == "Net" and model.head.weight.shape == (4, 6)
    spec = model_spec(model)
    assert spec == {"name": f"{user_file.resolve()}:Net", "num_classes": 4, "input_shape": [1, 4, 4],
                    "config": {"width": 6}}
    assert model_config(model) == {"width": 6}


def test_factory_without_num_classes_parameter(user_file):
    assert build_any(f"{user_file}:fixed", 3, SHAPE)(torch.zeros(1, *SHAPE)).shape == (1, 3)
    with pytest.raises(ModelSourceError) as exc:
        build_any(f"{user_file}:fixed", 10, SHAPE)
    assert "to (1, 3), but the logits must have shape (1, 10)" in _msg(exc)


def test_config_may_set_num_classes_itself(user_file):
    assert build_any(f"{user_file}:make", 3, SHAPE, {"num_classes": 3}).received["num_classes"] == 3
    with pytest.raises(ModelSourceError, match=r"must have shape \(1, 3\)"):
        build_any(f"{user_file}:make", 3, SHAPE, {"num_classes": 7})


def test_user_file_may_import_its_neighbours(tmp_path):
    (tmp_path / "blocks.py").write_text("from torch import nn\nWIDTH = 5\n")
    (tmp_path / "uses.py").write_text("import blocks\nfrom torch import nn\n\n"
                                      "def make(num_classes):\n"
                                      "    return nn.Sequential(nn.Flatten(), nn.Linear(16, blocks.WIDTH), "
                                      "nn.Linear(blocks.WIDTH, num_classes))\n")
    assert build_any(f"{tmp_path}/uses.py:make", 2, SHAPE)[1].out_features == 5
    assert str(tmp_path) not in sys.path


def test_file_changes_take_effect_on_the_next_build(user_file):
    assert build_any(f"{user_file}:fixed", 3, SHAPE)[1].in_features == 16
    user_file.write_text(user_file.read_text().replace("nn.Linear(16, 3))", "nn.Linear(16, 3), nn.ReLU())"))
    assert len(build_any(f"{user_file}:fixed", 3, SHAPE)) == 3


# ---------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(ModelSourceError) as exc:
        build_any(f"{tmp_path}/nope.py:make", 3, SHAPE)
    assert f"model file not found: {tmp_path}/nope.py" in _msg(exc)


def test_missing_attribute_lists_the_callables(user_file):
    with pytest.raises(ModelSourceError) as exc:
        build_any(f"{user_file}:build", 3, SHAPE)
    msg = _msg(exc)
    assert f"{user_file} has no 'build'" in msg
    assert "functions and classes defined there: Net, broken, fixed, make, needs_depth, not_a_model" in msg
    assert "LIMIT" not in msg and "nn," not in msg  # constants and imports are not offered


def test_missing_attribute_in_a_file_without_callables(tmp_path):
    (tmp_path / "empty.py").write_text("X = 1\n")
    with pytest.raises(ModelSourceError, match="defines no public functions or classes"):
        build_any(f"{tmp_path}/empty.py:make", 3, SHAPE)
    with pytest.raises(ModelSourceError, match="'X' in .* is a int, not a function or class"):
        build_any(f"{tmp_path}/empty.py:X", 3, SHAPE)


def test_file_that_fails_to_load(tmp_path):
    (tmp_path / "bad.py").write_text("def make(:\n")
    with pytest.raises(ModelSourceError) as exc:
        build_any(f"{tmp_path}/bad.py:make", 3, SHAPE)
    assert f"cannot load model file {tmp_path}/bad.py: SyntaxError" in _msg(exc)
    (tmp_path / "raises.py").write_text("import no_such_module_here\n")
    with pytest.raises(ModelSourceError, match="ModuleNotFoundError: No module named 'no_such_module_here'"):
        build_any(f"{tmp_path}/raises.py:make", 3, SHAPE)


def test_factory_that_raises_shows_the_exception(user_file):
    with pytest.raises(ModelSourceError) as exc:
        build_any(f"{user_file}:broken", 3, SHAPE)
    assert f"broken in {user_file} raised ValueError: depth must be even, got 3" in _msg(exc)


def test_factory_returning_something_else(user_file):
    with pytest.raises(ModelSourceError) as exc:
        build_any(f"{user_file}:not_a_model", 3, SHAPE)
    assert "returned dict, not a torch.nn.Module" in _msg(exc)


def test_bad_config_keys_name_the_accepted_parameters(user_file):
    with pytest.raises(ModelSourceError) as exc:
        build_any(f"{user_file}:make", 3, SHAPE, {"hiden": 5})
    msg = _msg(exc)
    assert "got an unexpected keyword argument 'hiden'" in msg
    assert "accepts num_classes, hidden, tag" in msg and "--config KEY=VALUE" in msg
    with pytest.raises(ModelSourceError) as exc:
        build_any(f"{user_file}:Net", 3, SHAPE, {"depth": 2})
    assert "accepts num_classes, width" in _msg(exc)
    with pytest.raises(ModelSourceError) as exc:
        build_any(f"{user_file}:needs_depth", 3, SHAPE)
    assert "missing a required argument: 'depth'" in _msg(exc) and "accepts depth, num_classes" in _msg(exc)


def test_model_that_does_not_fit_the_input_shape(user_file):
    with pytest.raises(ModelSourceError) as exc:
        build_any(f"{user_file}:wrong_input", 3, SHAPE)
    assert "fails on an input of shape (1, 1, 4, 4)" in _msg(exc) and "--input-shape 1,4,4" in _msg(exc)


def test_config_must_be_json(user_file):
    with pytest.raises(ModelSourceError, match="must be JSON values"):
        build_any(f"{user_file}:make", 3, SHAPE, {"tag": object()})


def test_zoo_errors_are_unchanged():
    with pytest.raises(ValueError, match="unknown model 'vgg'; valid names: mlp, cnn"):
        build_any("vgg", 10, SHAPE)
    with pytest.raises(ValueError, match="valid options: hidden"):
        build_any("mlp", 10, SHAPE, {"width": 3})
    with pytest.raises(ModelSourceError, match="not --config"):
        build_any("mlp", 10, SHAPE, {"num_classes": 3})


# ---------------------------------------------------------------- specs


@pytest.mark.parametrize("source,config", [("make", {"hidden": 7, "tag": "t"}), ("Net", {"width": 3}),
                                           (None, {"hidden": [6]})])
def test_spec_round_trip_rebuilds_the_same_model(user_file, source, config):
    name = "mlp" if source is None else f"{user_file}:{source}"
    torch.manual_seed(3)
    model = build_any(name, 5, SHAPE, config)
    spec = json.loads(json.dumps(model_spec(model)))
    torch.manual_seed(3)
    rebuilt = build_any(**spec)
    a, b = model.state_dict(), rebuilt.state_dict()
    assert [(k, v.shape) for k, v in a.items()] == [(k, v.shape) for k, v in b.items()]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the output check draws no random numbers
    assert model_spec(rebuilt) == spec


def test_bp_rebuild_and_save_torch_for_a_file_model(user_file, tmp_path):
    torch.manual_seed(0)
    model = build_any(f"{user_file}:Net", 3, SHAPE, {"width": 5})
    trained = {k: v.numpy() + 1.0 for k, v in model.state_dict().items()}
    rebuilt = build_from_spec(model_spec(model), trained, tmp_path)
    assert all(np.array_equal(v.numpy(), trained[k]) for k, v in rebuilt.state_dict().items())

    run = tmp_path / "run"
    run.mkdir()
    checkpoint.save(run / checkpoint.FILENAME, {f"param/{k}": v for k, v in trained.items()},
                    checkpoint.stamp({"model_spec": model_spec(model)}))
    res = CliRunner().invoke(app, ["save-torch", str(run), "--out", str(tmp_path / "w.pth")])
    assert res.exit_code == 0, res.output
    assert (f"model_sources.build_any('{user_file}:Net', 3, (1, 4, 4), {{'width': 5}}).load_state_dict("
            in res.output)
    saved = torch.load(tmp_path / "w.pth", weights_only=True)
    assert all(np.array_equal(saved[k].numpy(), trained[k]) for k in trained)


# ---------------------------------------------------------------- weights


def test_weights_into_a_file_model_with_another_head_size(user_file, tmp_path):
    torch.manual_seed(1)
    src = build_any(f"{user_file}:make", 5, SHAPE, {"hidden": 6})
    path = tmp_path / "pretrained.pth"
    torch.save(src.state_dict(), path)
    torch.manual_seed(2)
    dst = build_any(f"{user_file}:make", 3, SHAPE, {"hidden": 6})
    fresh = {k: v.clone() for k, v in dst.state_dict().items() if k.startswith("3.")}
    assert classifier_head(dst, 3) == "3"
    notes = load_any_weights(dst, path, 3)
    assert len(notes) == 2 and notes[0].startswith("3.weight: checkpoint (5, 6) vs model (3, 6)")
    assert "kept the freshly initialised 3-class head" in notes[0]
    d, s = dst.state_dict(), src.state_dict()
    assert torch.equal(d["1.weight"], s["1.weight"]) and torch.equal(d["1.bias"], s["1.bias"])
    assert all(torch.equal(d[k], v) for k, v in fresh.items())


def test_weights_with_a_matching_head_load_everything(user_file, tmp_path):
    torch.manual_seed(1)
    src = build_any(f"{user_file}:Net", 3, SHAPE)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "w.pth")
    dst = build_any(f"{user_file}:Net", 3, SHAPE)
    assert load_any_weights(dst, tmp_path / "w.pth", 3) == []
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True))


def test_weights_errors_for_a_file_model(user_file, tmp_path):
    model = build_any(f"{user_file}:make", 3, SHAPE, {"hidden": 6})
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_any_weights(model, tmp_path / "nope.pth", 3)
    torch.save(build_any(f"{user_file}:make", 3, SHAPE, {"hidden": 4}).state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(ValueError, match=r"shapes differ from the model: 1.weight \(4, 16\) vs model \(6, 16\)"):
        load_any_weights(model, tmp_path / "narrow.pth", 3)
    torch.save(build_any(f"{user_file}:Net", 3, SHAPE).state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"missing keys \[1.bias, 1.weight\]; unexpected keys \[body.bias"):
        load_any_weights(model, tmp_path / "other.pth", 3)


def test_classifier_head_is_the_last_module_with_num_classes_rows():
    model = nn.Sequential(nn.Linear(4, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 3)), nn.ReLU())
    assert classifier_head(model, 3) == "1.1"
    with pytest.raises(ModelSourceError, match="no module has a weight with 7 rows"):
        classifier_head(model, 7)


# ---------------------------------------------------------------- torchvision


def test_torchvision_that_does_not_import_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(ModelSourceError) as exc:
        build_any("torchvision:resnet18", 10, (3, 32, 32))
    msg = _msg(exc)
    assert "needs torchvision, which does not import here" in msg
    assert "import of torchvision.models halted" in msg or "import of torchvision halted" in msg
    assert "pip install 'asyncfgd[vision]'" in msg and f"torch {torch.__version__}" in msg


def test_torchvision_builder_is_called_without_weights(monkeypatch):
    """torchvision's API as build_any uses it, faked: runs whether or not torchvision imports here."""
    import types

    calls = []

    def get_model(name, **kwargs):
        calls.append((name, kwargs))
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, kwargs["num_classes"]))

    def get_model_builder(name):
        if name != "tiny":
            raise ValueError(f"Unknown model {name}")
        return get_model

    fake = types.ModuleType("torchvision.models")
    vars(fake).update(get_model=get_model, get_model_builder=get_model_builder,
                      list_models=lambda module=None: ["tiny", "alexnet"])
    package = types.ModuleType("torchvision")
    vars(package)["models"] = fake
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.models", fake)

    model = build_any("torchvision:tiny", 4, (3, 8, 8), {"dropout": 0.5})
    assert calls == [("tiny", {"weights": None, "num_classes": 4, "dropout": 0.5})]
    assert model_spec(model)["config"] == {"dropout": 0.5}
    with pytest.raises(ModelSourceError, match="no classification model 'vgg'; its models: alexnet, tiny"):
        build_any("torchvision:vgg", 4, (3, 8, 8))
    with pytest.raises(ModelSourceError, match="may not set weights_backbone"):
        build_any("torchvision:tiny", 4, (3, 8, 8), {"weights_backbone": "DEFAULT"})


def _torchvision():
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # e.g. "operator torchvision::nms does not exist": built for another torch
        pytest.skip(f"torchvision does not import here ({type(exc).__name__}: {exc})")


def test_torchvision_models_build_without_weights(tmp_path):
    _torchvision()
    torch.manual_seed(0)
    model = build_any("torchvision:resnet18", 10, (3, 32, 32))
    assert model.fc.out_features == 10
    spec = model_spec(model)
    assert spec == {"name": "torchvision:resnet18", "num_classes": 10, "input_shape": [3, 32, 32], "config": {}}
    assert classifier_head(model, 10) == "fc"
    torch.save(build_any("torchvision:resnet18", 1000, (3, 32, 32)).state_dict(), tmp_path / "in1k.pth")
    notes = load_any_weights(model, tmp_path / "in1k.pth", 10)
    assert [n.split(":")[0] for n in notes] == ["fc.weight", "fc.bias"]
    with pytest.raises(ModelSourceError, match="has no classification model 'resnet7'.*resnet18"):
        build_any("torchvision:resnet7", 10, (3, 32, 32))
    with pytest.raises(ModelSourceError, match="weights come only from a local file"):
        build_any("torchvision:resnet18", 10, (3, 32, 32), {"weights": "DEFAULT"})
    with pytest.raises(ModelSourceError, match="could not be built"):
        build_any("torchvision:resnet18", 10, (3, 32, 32), {"no_such_option": 1})


# ---------------------------------------------------------------- cache key and CLI


def test_cache_key_follows_the_file_contents(user_file):
    opts = ExportOptions(f"{user_file}:make", 3, SHAPE, config={"hidden": 4})
    key = opts.key()
    assert key == ExportOptions(f"{user_file}:make", 3, SHAPE, config={"hidden": 4}).key()
    assert source_key("mlp") is None and source_key(f"{user_file}:make")["name"] == f"{user_file}:make"
    user_file.write_text(user_file.read_text() + "\n# edited\n")
    assert opts.key() != key
    with pytest.raises(ModelSourceError, match="cannot read model file"):
        ExportOptions(f"{user_file.parent}/gone.py:make", 3, SHAPE).key()


def _invoke(args: list[str], tmp_path: Path):
    return CliRunner().invoke(app, args, env={"TQDM_DISABLE": "1", "ASYNCFGD_CACHE": str(tmp_path / "cache")})


def test_export_cli_with_a_file_model_config_and_weights(user_file, tmp_path):
    torch.save(build_any(f"{user_file}:make", 5, SHAPE, {"hidden": 6}).state_dict(), tmp_path / "w.pth")
    out = tmp_path / "art"
    res = _invoke(["export", "--model", f"{user_file}:make", "--config", "hidden=6", "--weights",
                   str(tmp_path / "w.pth"), "--num-classes", "3", "--input-shape", "1,4,4", "--out", str(out)],
                  tmp_path)
    assert res.exit_code == 0, res.output
    assert "note: 3.weight: checkpoint (5, 6) vs model (3, 6)" in res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == {"name": f"{user_file}:make", "num_classes": 3, "input_shape": [1, 4, 4],
                                 "config": {"hidden": 6}}


@pytest.mark.parametrize("args,message", [
    (["export", "--model", "{dir}/nope.py:make", "--num-classes", "3", "--input-shape", "1,4,4", "--out", "{dir}/o"],
     "model file not found"),
    (["export", "--model", "{file}:make", "--config", "hiden=3", "--num-classes", "3", "--input-shape", "1,4,4",
      "--out", "{dir}/o"], "accepts num_classes, hidden, tag"),
    (["export", "--model", "{file}:build", "--num-classes", "3", "--input-shape", "1,4,4", "--out", "{dir}/o"],
     "functions and classes defined there: Net,"),
    (["train", "--model", "{dir}/nope.py:make", "--epochs", "1"], "cannot read model file"),
    (["bench-tangents", "--model", "{file}:broken", "--input-shape", "1,4,4"], "raised ValueError: depth must be"),
    (["bench-pipeline", "--models", "timm:resnet18"], "unknown model source 'timm'"),
])
def test_cli_errors_are_one_paragraph(user_file, tmp_path, args, message):
    args = [a.format(dir=tmp_path, file=user_file) for a in args]
    res = _invoke(args, tmp_path)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and message in " ".join(res.output.split())
