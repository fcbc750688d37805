"""Read an artifact directory (docs/artifacts.md) on the device: manifest, graphs, weights.

Everything a user can get wrong about a directory (missing files, a truncated or edited ONNX
file, a foreign format version) is reported as ``ArtifactError`` with what to do about it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import contract as c
from .dual.program import ActivityPlan
from .masks import DropoutSite

F32 = 4  # bytes per element: every weight, tangent and statistic is float32


def param_numel(module: dict[str, Any]) -> int:
    """Trainable elements of a manifest module entry."""
    return sum(math.prod(int(d) for d in p["shape"]) for p in module["params"])


class ArtifactError(Exception):
    """The artifact directory is missing, incomplete, corrupt or of another format version."""


@dataclass
class ModuleInfo:
    index: int
    is_last: bool
    in_shape: list[int]
    out_shape: list[int]
    params: list[dict[str, Any]]
    buffers: list[dict[str, Any]]
    graphs: dict[str, dict[str, Any]]
    cost_flops: int
    raw: dict[str, Any]

    @property
    def param_names(self) -> list[str]:
        return [p["name"] for p in self.params]

    @property
    def buffer_names(self) -> list[str]:
        return [b["name"] for b in self.buffers]

    @property
    def dropout(self) -> list[DropoutSite]:
        """The module's dropout layers, whose masks the training roles take (none in format 1)."""
        return [DropoutSite.from_dict(d) for d in self.raw.get("dropout", [])]

    @property
    def activity(self) -> ActivityPlan | None:
        """The local-activity method's perturbation plan, when exported with it."""
        raw = self.raw.get("activity")
        return ActivityPlan.from_dict(raw) if raw else None


@dataclass
class Artifacts:
    root: Path
    manifest: dict[str, Any]
    modules: list[ModuleInfo]
    weights: dict[str, np.ndarray]  # initial weights and BN statistics, by qualified name

    @property
    def num_classes(self) -> int:
        return int(self.manifest["model"]["num_classes"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["model"]["input_shape"])

    @property
    def tangents(self) -> int:
        return int(self.manifest["tangents"])

    @property
    def bn_mode(self) -> str:
        return str(self.manifest["bn_mode"])

    @property
    def tuned_batch(self) -> int:
        """The batch the graphs' cost-based forms were chosen for (64 in artifacts older than 0.5)."""
        return int(self.manifest.get("tuned_batch", 64))

    def graph_path(self, index: int, role: str) -> Path:
        mod = self.modules[index]
        if role not in mod.graphs:
            raise ArtifactError(f"module {index} has no '{role}' graph (it has: {', '.join(mod.graphs)})")
        return self.root / mod.graphs[role]["file"]

    def graph_bytes(self, index: int, role: str) -> bytes:
        """The ONNX file, checked against the manifest's sha256 so a corrupt file never runs."""
        path = self.graph_path(index, role)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ArtifactError(f"cannot read graph file {path}: {exc}. Re-run `asyncfgd-app export`.") from None
        want = self.modules[index].graphs[role].get("sha256")
        if want and hashlib.sha256(data).hexdigest() != want:
            raise ArtifactError(f"graph file {path} does not match its checksum in manifest.json: it is truncated "
                                f"or was modified after export. Re-run `asyncfgd-app export` to recreate it.")
        return data


def load_artifacts(root: str | os.PathLike[str]) -> Artifacts:
    root = Path(root)
    mpath = root / c.MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{root} is not an artifact directory: manifest.json is missing. Create one with "
                            f"`asyncfgd-app export --model NAME --out {root}`.")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{mpath} is not valid JSON ({exc}); re-run `asyncfgd-app export`.") from None
    if manifest.get("format") != c.FORMAT or manifest.get("format_version") not in c.SUPPORTED_VERSIONS:
        raise ArtifactError(f"{mpath} has format {manifest.get('format')!r} "
                            f"version {manifest.get('format_version')!r}; "
                            f"this runtime reads {c.FORMAT} versions {c.SUPPORTED_VERSIONS}.")
    try:
        modules = [ModuleInfo(m["index"], m["is_last"], m["in_shape"], m["out_shape"], m["params"], m["buffers"],
                              m["graphs"], m.get("cost_flops", 0), m) for m in manifest["modules"]]
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{mpath} lacks a required field ({exc}); re-run `asyncfgd-app export`.") from None
    weights = load_weights_file(root / manifest.get("weights_file", c.WEIGHTS_FILE))
    missing = [n for m in modules for n in (*m.param_names, *m.buffer_names) if n not in weights]
    if missing:
        raise ArtifactError(f"weights file lacks {len(missing)} tensors named in the manifest (e.g. {missing[:3]}); "
                            f"re-run `asyncfgd-app export`.")
    return Artifacts(root, manifest, modules, weights)


def load_weights_file(path: Path) -> dict[str, np.ndarray]:
    """Read an .npz of float32 tensors; a truncated or corrupt file is an ArtifactError."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: np.ascontiguousarray(z[k], dtype=np.float32) for k in z.files}
    except FileNotFoundError:
        raise ArtifactError(f"weights file {path} is missing; re-run `asyncfgd-app export`.") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ArtifactError(f"weights file {path} is corrupt or truncated ({exc}); re-run `asyncfgd-app export` "
                            f"or restore it from a backup.") from None
