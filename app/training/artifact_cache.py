"""Export-on-the-fly for `train --model`: artifact directories cached by a hash of the export options.

Exporting takes seconds (tracing, ONNX emission), so repeated runs with the same model reuse the
directory. The key covers everything the graphs and initial weights depend on: model name and
config, split (and the batch size it is balanced for), BatchNorm mode, tangents per pass, local
heads and the local-activity graphs (with their per-layer choices), the dataset's shape and classes,
the init seed (models draw their init from the global torch RNG), the bytes of a ``--weights`` file,
the package version and a digest of the exporter's and runtime's source (a newer or edited
exporter may emit different graphs; an editable install keeps its version number across edits)
and, for a ``--model
PATH.py:FACTORY``, the file's absolute path and bytes (not those of modules it imports), for
``--model torchvision:NAME`` torchvision's version. A directory is reused only if it loads and every
graph still matches its checksum; otherwise it is exported again. Exports go to a temporary
directory that is renamed into place, so an interrupted export never leaves a half-written entry
behind.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import asyncfgd.exporter
import asyncfgd.runtime
from asyncfgd.exporter.model_sources import source_key
from asyncfgd.runtime.artifacts import ArtifactError, load_artifacts

CACHE_ENV = "ASYNCFGD_CACHE"


@dataclass(frozen=True)
class ExportOptions:
    """What `asyncfgd-app train --model ...` exports; also the cache key's content."""

    model: str
    num_classes: int
    input_shape: tuple[int, int, int]
    modules: int = 2
    split: tuple[str, ...] | None = None
    bn_mode: str = "train"
    tangents: int = 1
    seed: int = 0
    weights: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    local_heads: bool = False  # auxiliary heads for the experimental ``local`` method
    activity: bool = False  # heads and the activity role for the ``local-activity`` method
    perturb: tuple[tuple[str, str], ...] = ()  # its per-layer choices (layer, activity | weight)
    balance_batch: int = 64  # the training batch an automatic split is balanced for

    def key(self) -> str:
        """16 hex digits of sha256 over the options, the weights file's bytes, the package version and
        the graph code's source."""
        content = asdict(self)
        content["weights"] = _file_sha256(Path(self.weights)) if self.weights else None
        content["asyncfgd"] = version("asyncfgd")
        content["graph_code"] = graph_code_digest()
        source = source_key(self.model)
        if source is not None:  # zoo models keep their keys
            content["model_source"] = source
        blob = json.dumps(content, sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def source_digest(roots: list[Path]) -> str:
    """sha256 over every ``.py`` file under ``roots``: relative names and bytes, in sorted order."""
    h = hashlib.sha256()
    for root in roots:
        for f in sorted(root.rglob("*.py")):
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


@functools.cache
def graph_code_digest() -> str:
    """The source of the packages that write and define the graphs (exporter, runtime)."""
    return source_digest([Path(asyncfgd.exporter.__file__).parent, Path(asyncfgd.runtime.__file__).parent])


def _file_sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise ValueError(f"cannot read --weights file {path}: {exc.strerror or exc}") from None


def cache_root() -> Path:
    """``$ASYNCFGD_CACHE`` or ``~/.cache/asyncfgd/artifacts``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "asyncfgd" / "artifacts"


def is_valid(directory: Path) -> bool:
    """The directory loads and every graph matches the checksum recorded at export."""
    try:
        arts = load_artifacts(directory)
        for mod in arts.modules:
            for role in mod.graphs:
                arts.graph_bytes(mod.index, role)
    except ArtifactError:
        return False
    return True


def export(opts: ExportOptions, out_dir: Path) -> None:
    """Build the model (any ``--model`` source) with ``opts.seed``, optionally load weights, and export it
    (needs torch)."""
    import torch

    from asyncfgd.exporter.export import export_model
    from asyncfgd.exporter.model_sources import build_any, load_any_weights
    from asyncfgd.exporter.models import model_spec

    torch.manual_seed(opts.seed)
    model = build_any(opts.model, opts.num_classes, opts.input_shape, opts.config)
    if opts.weights:
        for note in load_any_weights(model, opts.weights, opts.num_classes):
            print(f"note: {note}", file=sys.stderr)
    export_model(model, out_dir, opts.input_shape, opts.num_classes, modules=opts.modules,
                 split_at=list(opts.split) if opts.split else None, bn_mode=opts.bn_mode,
                 tangents=opts.tangents, model_spec=model_spec(model), local_heads=opts.local_heads, seed=opts.seed,
                 balance_batch=opts.balance_batch, activity=opts.activity, perturb=dict(opts.perturb))


def cached_artifacts(opts: ExportOptions) -> Path:
    """The artifact directory for ``opts``: reused when valid, else exported (atomically) now."""
    root = cache_root()
    target = root / opts.key()
    if is_valid(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    count = len(opts.split) + 1 if opts.split else opts.modules
    print(f"exporting {opts.model} ({count} modules, {opts.tangents} tangent(s)) to {target}", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        export(opts, tmp)
        if target.exists():
            shutil.rmtree(target)  # an invalid leftover (e.g. a file was damaged)
        try:
            tmp.rename(target)
        except OSError:
            if not is_valid(target):  # else a concurrent run exported the same key first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
