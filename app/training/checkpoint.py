"""Run checkpoints: one ``.npz`` of arrays plus JSON metadata, replaced atomically.

The file is written to a temporary file in the run directory, flushed and fsynced, then renamed
over the old one, so a crash or a full disk at any moment leaves the previous checkpoint intact.

Array names: ``param/<weight>`` and ``buffer/<BN statistic>`` (the model's own state_dict names,
for every module), ``optim/<module>/<key>`` (each module's optimizer state), ``flight/<i>/h``,
``h_dot``, ``labels`` (AsyncFGD's in-flight mini-batches), and ``__meta__`` (a JSON string: data
position, scheduler counters, schedule config, seeds, metrics so far). The pipeline is *not*
drained at a checkpoint: the in-flight mini-batches are saved, so a resumed run continues the
identical stream and ends with bit-identical weights.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "asyncfgd-checkpoint"
FORMAT_VERSION = 1
FILENAME = "checkpoint.npz"
_META = "__meta__"

Arrays = dict[str, np.ndarray]


class CheckpointError(Exception):
    """A checkpoint cannot be written, read, or does not fit the run; the message says what to do."""


def _write_npz(file: Any, arrays: Arrays) -> None:
    """The one place bytes are written (tests replace it to simulate a full disk)."""
    np.savez(file, **arrays)


def save(path: Path, arrays: Arrays, meta: dict[str, Any]) -> None:
    """Atomically replace ``path`` with ``arrays`` + ``meta``; on failure the old file is untouched."""
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # not mkstemp's 0600: other users may read the run
            _write_npz(f, {**arrays, _META: np.array(json.dumps(meta))})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        old = (f"The previous checkpoint {path} is intact: fix the problem (e.g. free disk space) and continue "
               f"with `asyncfgd-app train --resume {path.parent}`." if path.exists()
               else "No earlier checkpoint of this run exists.")
        raise CheckpointError(f"cannot write the checkpoint in {path.parent}: {exc.strerror or exc}. {old}") from None


def load(path: Path) -> tuple[Arrays, dict[str, Any]]:
    """Read a checkpoint written by ``save``."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: the run directory must contain {FILENAME} "
                              f"(written after every epoch). Start a new run without --resume.")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop(_META)))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({exc}); it cannot be resumed. "
                              f"Start a new run.") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not an asyncfgd checkpoint of format version {FORMAT_VERSION}.")
    return arrays, meta


def stamp(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` with the format fields ``load`` checks."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}


def section(arrays: Arrays, prefix: str) -> Arrays:
    """The arrays under ``prefix/``, keyed by the rest of their name."""
    start = prefix + "/"
    return {k[len(start):]: v for k, v in arrays.items() if k.startswith(start)}


def model_state(arrays: Arrays) -> Arrays:
    """Weights and BN statistics by the model's own state_dict names (for save-torch)."""
    return {**section(arrays, "param"), **section(arrays, "buffer")}


def runtime_state(runners: list[Any], scheduler: Any) -> tuple[Arrays, dict[str, Any]]:
    """Everything the FGD runtime needs to continue bit for bit: weights, optimizers, pipeline."""
    sched = scheduler.state_dict()  # applies pending updates first
    arrays: Arrays = {}
    for r in runners:
        arrays.update({f"param/{n}": r.to_host(p) for n, p in r.params.items()})
        arrays.update({f"buffer/{n}": r.to_host(b) for n, b in r.buffers.items()})
    for r, opt in zip(runners, scheduler.optimizers, strict=True):
        arrays.update({f"optim/{r.index}/{key}": np.asarray(v) for key, v in opt.state_dict().items()})
    return with_in_flight(arrays, sched["next_step"], sched.get("in_flight", []))


def with_in_flight(arrays: Arrays, next_step: int, flights: list[dict[str, Any]]) -> tuple[Arrays, dict[str, Any]]:
    """A runtime state: ``arrays`` (weights, optimizer state; any ``flight/`` entries replaced) plus the
    scheduler's in-flight mini-batches ``flights``, stored in module order."""
    out = {k: v for k, v in arrays.items() if not k.startswith("flight/")}
    meta = []
    for i, f in enumerate(sorted(flights, key=lambda f: f["module"])):
        out[f"flight/{i}/h"], out[f"flight/{i}/labels"] = f["h"], f["labels"]
        if f["h_dot"] is not None:
            out[f"flight/{i}/h_dot"] = f["h_dot"]
        meta.append({"module": f["module"], "step": f["step"], "offset": f.get("offset", 0)})
    return out, {"next_step": next_step, "in_flight": meta}


def in_flight(arrays: Arrays, state: dict[str, Any]) -> list[dict[str, Any]]:
    """The in-flight mini-batches of a runtime state, as the schedulers' ``load_state_dict`` takes them."""
    return [{"module": f["module"], "step": f["step"], "offset": f.get("offset", 0), "h": arrays[f"flight/{i}/h"],
             "labels": arrays[f"flight/{i}/labels"], "h_dot": arrays.get(f"flight/{i}/h_dot")}
            for i, f in enumerate(state["in_flight"])]


def restore_runtime_state(arrays: Arrays, state: dict[str, Any], runners: list[Any], scheduler: Any) -> None:
    """Inverse of ``runtime_state``, writing into the live buffers in place."""
    saved = model_state(arrays)
    for r in runners:
        for n, dst in (*r.params.items(), *r.buffers.items()):
            src = saved.get(n)
            if src is None or tuple(src.shape) != tuple(dst.shape):
                raise CheckpointError(f"the checkpoint does not match the artifacts: tensor {n} is "
                                      f"{'missing' if src is None else f'shaped {src.shape}'}. Resume with the "
                                      f"artifacts the run was started with.")
            r.from_host(dst, src)
    try:
        for r, opt in zip(runners, scheduler.optimizers, strict=True):
            opt.load_state_dict(section(arrays, f"optim/{r.index}"))
    except ValueError as exc:
        raise CheckpointError(f"the checkpoint's optimizer state does not fit this run ({exc}).") from None
    scheduler.load_state_dict({"next_step": state["next_step"], "in_flight": in_flight(arrays, state)})
