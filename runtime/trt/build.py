"""Build and cache one TensorRT engine per (module, graph role) of an artifact directory.

An engine is only valid for the exact ONNX bytes, TensorRT version, GPU, precision and batch
profile it was built for, and building takes minutes on a Jetson, so engines are cached in
``<artifacts>/engines/`` with a JSON index recording that key per engine file (the file name
carries a digest of the key, so variants coexist). An entry whose key does not match, or whose
engine file is missing or altered, is rebuilt, never reused; engines of an older version of a
graph are deleted. The key and staleness logic are pure functions, tested without TensorRT.

NOTE: :func:`build_engines`' TensorRT calls follow the TensorRT 10 Python API documentation and
have never been executed: TensorRT could not be installed where this was written.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import contract as c
from .env import load_trt, trt_logger

log = logging.getLogger(__name__)

ENGINES_DIR = "engines"
INDEX_FILE = "index.json"
INDEX_FORMAT = 2


@dataclass(frozen=True)
class BuildKey:
    """Everything an engine's validity depends on (workspace size only bounds tactic search)."""

    onnx_sha256: str
    trt_version: str
    gpu: str
    precision: str                 # "fp16" | "fp32"
    profile: tuple[int, int, int]  # batch (min, opt, max)

    def digest(self) -> str:
        """Short stable hash of the key, used in engine file names."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    """Hash a file in chunks (engines and ONNX graphs can be hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def batch_profile(max_batch: int, opt_batch: int | None = None) -> tuple[int, int, int]:
    """The (min, opt, max) batch range of the optimisation profile; opt defaults to max."""
    opt = max_batch if opt_batch is None else opt_batch
    if not 1 <= opt <= max_batch:
        raise ValueError(f"need 1 <= opt_batch ({opt}) <= max_batch ({max_batch})")
    return (1, opt, max_batch)


def profile_shapes(dims: Iterable[int], profile: tuple[int, int, int],
                   name: str = "") -> tuple[tuple[int, ...], ...] | None:
    """Min/opt/max shapes for one network input whose dynamic (-1) dim is the batch.

    Returns None for a fully static input. The batch dim is axis 0 for ``x``/``labels`` and
    axis 1 for ``x_dot`` (m, N, ...), so its position is read from the dims, not assumed.
    """
    dims = [int(d) for d in dims]
    dynamic = [i for i, d in enumerate(dims) if d < 0]
    if not dynamic:
        return None
    if len(dynamic) > 1:
        raise ValueError(f"input {name!r} has dynamic dims at axes {dynamic}; only the batch dim may be dynamic")
    axis = dynamic[0]
    return tuple(tuple(b if i == axis else d for i, d in enumerate(dims)) for b in profile)


def load_index(engines_dir: Path) -> dict[str, Any]:
    """The cache index, or an empty one when absent or from another index format."""
    path = engines_dir / INDEX_FILE
    if path.exists():
        index = json.loads(path.read_text())
        if index.get("format") == INDEX_FORMAT:
            return index
    return {"format": INDEX_FORMAT, "entries": {}}


def save_index(engines_dir: Path, index: dict[str, Any]) -> None:
    """Write atomically so an interrupted build never leaves a half-written index."""
    tmp = engines_dir / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index, indent=2))  # entry order matters: latest last
    os.replace(tmp, engines_dir / INDEX_FILE)


def find_entry(index: dict[str, Any], graph_file: str, key: BuildKey) -> dict[str, Any] | None:
    """The entry built for exactly ``key``, else the graph's latest entry (to say why it differs)."""
    exact = index["entries"].get(engine_name(graph_file, key))
    if exact is not None:
        return exact
    same_graph = [e for e in index["entries"].values() if e.get("graph") == graph_file]
    return same_graph[-1] if same_graph else None


def stale_reason(entry: dict[str, Any] | None, key: BuildKey, engines_dir: Path) -> str | None:
    """Why a cache entry cannot serve ``key`` (None: it can). Checks the key, then the file."""
    if entry is None:
        return "not built yet"
    recorded = entry.get("key", {})
    want = json.loads(json.dumps(asdict(key)))  # as stored: tuples become lists
    if recorded.get("onnx_sha256") != want["onnx_sha256"]:
        return "ONNX graph changed"
    for field in ("trt_version", "gpu", "precision", "profile"):
        if recorded.get(field) != want[field]:
            return f"{field} differs (cached {recorded.get(field)!r}, need {want[field]!r})"
    engine = engines_dir / entry.get("engine", "")
    if not entry.get("engine") or not engine.is_file():
        return "engine file missing"
    if file_sha256(engine) != entry.get("engine_sha256"):
        return "engine file altered (sha256 mismatch)"
    return None


def record_entry(index: dict[str, Any], graph_file: str, key: BuildKey, engine_file: str,
                 engine_sha256: str) -> list[str]:
    """Remember a freshly built engine; forget (and return, for deletion) the graph's engines
    built from older ONNX bytes. Variants of the current graph (precision, profile, TensorRT
    version) are kept, so switching between them does not rebuild."""
    obsolete = [name for name, e in index["entries"].items()
                if e.get("graph") == graph_file and e["key"]["onnx_sha256"] != key.onnx_sha256]
    for name in obsolete:
        del index["entries"][name]
    index["entries"].pop(engine_file, None)  # re-insert last: the graph's latest entry
    index["entries"][engine_file] = {"graph": graph_file, "engine": engine_file,
                                     "engine_sha256": engine_sha256, "key": asdict(key)}
    return obsolete


def engine_name(graph_file: str, key: BuildKey) -> str:
    """``m0.dual.onnx`` -> ``m0.dual.<digest>.engine``: keyed names never overwrite another key."""
    return f"{Path(graph_file).stem}.{key.digest()}.engine"


def read_manifest(artifact_dir: Path) -> dict[str, Any]:
    """Load ``manifest.json`` with an error that names the directory."""
    path = artifact_dir / c.MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{artifact_dir} has no manifest.json: is it an `asyncfgd-app export` directory?")
    return json.loads(path.read_text())


def select_graphs(manifest: dict[str, Any], roles: Iterable[str] | None = None,
                  modules: Iterable[int] | None = None) -> list[tuple[int, str, str]]:
    """(module index, role, ONNX file) for every graph to build, in manifest order."""
    wanted_roles = set(c.ROLES if roles is None else roles)
    unknown = wanted_roles - set(c.ROLES)
    if unknown:
        raise ValueError(f"unknown graph roles {sorted(unknown)}; known: {list(c.ROLES)}")
    wanted_modules = None if modules is None else set(modules)
    return [(m["index"], role, g["file"])
            for m in manifest["modules"] if wanted_modules is None or m["index"] in wanted_modules
            for role, g in m["graphs"].items() if role in wanted_roles]


def build_engines(artifact_dir: str | Path, fp16: bool = False, workspace_mb: int = 1024,
                  max_batch: int = 64, opt_batch: int | None = None, roles: Iterable[str] | None = None,
                  modules: Iterable[int] | None = None) -> dict[tuple[int, str], Path]:
    """Build (or reuse from cache) one engine per graph; return {(module, role): engine path}.

    Raises BackendUnavailable without TensorRT/pycuda/GPU. Never executed (see module note).
    """
    artifact_dir = Path(artifact_dir)
    graphs = select_graphs(read_manifest(artifact_dir), roles, modules)
    profile = batch_profile(max_batch, opt_batch)
    trt, cuda = load_trt()
    logger = trt_logger(trt)
    gpu = cuda.Device(0).name()
    engines_dir = artifact_dir / ENGINES_DIR
    engines_dir.mkdir(exist_ok=True)
    index = load_index(engines_dir)
    out: dict[tuple[int, str], Path] = {}
    for module, role, graph_file in graphs:
        key = BuildKey(file_sha256(artifact_dir / graph_file), str(trt.__version__), gpu,
                       "fp16" if fp16 else "fp32", profile)
        entry = find_entry(index, graph_file, key)
        reason = stale_reason(entry, key, engines_dir)
        if reason is None:
            assert entry is not None  # stale_reason returns None only for an existing entry
            out[(module, role)] = engines_dir / entry["engine"]
            continue
        log.warning("building TensorRT engine for %s (%s); this can take minutes", graph_file, reason)
        plan = _build_plan(trt, logger, artifact_dir / graph_file, profile, fp16, workspace_mb)
        name = engine_name(graph_file, key)
        tmp = engines_dir / (name + ".tmp")
        tmp.write_bytes(plan)
        os.replace(tmp, engines_dir / name)
        obsolete = record_entry(index, graph_file, key, name, hashlib.sha256(plan).hexdigest())
        save_index(engines_dir, index)
        for old in obsolete:
            (engines_dir / old).unlink(missing_ok=True)
        out[(module, role)] = engines_dir / name
    return out


def _build_plan(trt: Any, logger: Any, onnx_path: Path, profile: tuple[int, int, int],
                fp16: bool, workspace_mb: int) -> bytes:
    """Parse one ONNX graph and build a serialized engine (explicit batch, one profile)."""
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(f"  {parser.get_error(i)}" for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    opt = builder.create_optimization_profile()
    dynamic = False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shapes = profile_shapes(tuple(tensor.shape), profile, tensor.name)
        if shapes is not None:
            opt.set_shape(tensor.name, *shapes)
            dynamic = True
    if dynamic:
        config.add_optimization_profile(opt)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path.name} (see its log above)")
    return bytes(plan)
