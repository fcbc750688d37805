"""`asyncfgd-app export-inference`: a trained run as one ONNX inference graph (no torch needed)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import onnx
import typer

from asyncfgd.app.commands.common import USER_ERRORS, fail
from asyncfgd.runtime import contract as c

RunArg = Annotated[Path, typer.Argument(help="Run directory written by `asyncfgd-app train` (config.json, "
                                             "checkpoint.npz).")]
OutOpt = Annotated[Path, typer.Option("--out", help="The .onnx file to write.")]
SoftmaxOpt = Annotated[bool, typer.Option("--softmax", help="Also output 'probabilities' (softmax of the logits).")]
Fp16Opt = Annotated[bool, typer.Option("--fp16", help="Compute in float16 (input and outputs stay float32) and "
                                                      "report the accuracy change on the run's test set.")]
ArtsOpt = Annotated[Path | None, typer.Option("--artifacts", help="The run's artifact directory, if it moved "
                                                                  "(default: the one config.json names).")]
EvalOpt = Annotated[bool, typer.Option("--evaluate/--no-evaluate", help="Report the exported model's accuracy on "
                                                                        "the run's test set.")]


def register(app: typer.Typer) -> None:
    """Add the `export-inference` command to the CLI."""

    @app.command("export-inference")
    def export_inference_cmd(run: RunArg, out: OutOpt, softmax: SoftmaxOpt = False, fp16: Fp16Opt = False,
                             artifacts: ArtsOpt = None, evaluate: EvalOpt = True) -> None:
        """Write a run's trained network as ONE ONNX graph for deployment: input → logits, the trained
        weights and BatchNorm statistics baked in, a dynamic batch, opset 17, TensorRT-compatible.

        Built from the artifact directory and the checkpoint, not the Python model: it works for every
        model source and on a device without torch."""
        from asyncfgd.app.training import checkpoint
        from asyncfgd.exporter.inference import build_inference, to_fp16
        from asyncfgd.exporter.trt_check import check_trt_compat
        from asyncfgd.runtime.artifacts import load_artifacts

        try:
            config = _config(run)
            arts = load_artifacts(artifacts or config.get("artifacts_dir") or "")
            arrays, _ = checkpoint.load(run / checkpoint.FILENAME)
            model32 = build_inference(arts.manifest, checkpoint.model_state(arrays), softmax)
            model = to_fp16(model32) if fp16 else model32
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(model.SerializeToString())
        except USER_ERRORS as exc:
            fail(str(exc))
        errors = [i for i in check_trt_compat(model) if i.severity == "error"]
        typer.echo(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {'float16' if fp16 else 'float32'}): "
                   f"input x (N, {', '.join(map(str, arts.input_shape))}) -> logits (N, {arts.num_classes})"
                   f"{' and probabilities' if softmax else ''}; TensorRT check: "
                   f"{'clean' if not errors else f'{len(errors)} error(s)'}")
        if evaluate:
            x, y = _test_set(config)
            acc = _accuracy(model32, x, y)
            line = f"test accuracy ({len(y)} samples): {100 * acc:.2f}% in float32"
            if fp16:
                acc16 = _accuracy(model, x, y)
                line += f", {100 * acc16:.2f}% in float16 (change {100 * (acc16 - acc):+.2f} points)"
            typer.echo(line)


def _config(run: Path) -> dict:
    path = run / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run} is not a run directory: it has no config.json (written by `asyncfgd-app "
                                f"train`).")
    return json.loads(path.read_text())


def _test_set(config: dict) -> tuple[np.ndarray, np.ndarray]:
    from asyncfgd.app.training.data import load_dataset

    data = load_dataset(config["data"])
    return data.test.images, data.test.labels


def _accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, batch: int = 256) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # float16 graphs make ORT warn about folding constants it has no CPU kernel for
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    right = 0
    for i in range(0, len(y), batch):
        logits = sess.run([c.LOGITS], {c.X: x[i:i + batch].astype(np.float32)})[0]
        right += int((logits.argmax(1) == y[i:i + batch]).sum())
    return right / max(1, len(y))
