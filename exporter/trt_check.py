"""Static check of an ONNX graph against TensorRT 10's ONNX parser, without TensorRT.

Engines are built on the device (a Jetson), minutes after export and far from the exporter.
Checking on the host that every node is one TensorRT's parser can import turns a late,
opaque parser failure on the device into an early, named error at export time.

The operator table follows the onnx-tensorrt operator support matrix (``docs/operators.md``)
for **TensorRT 10.3**, the TensorRT that JetPack 6.1/6.2 ships: the TensorRT 10.x matrix
with the operators that onnx-tensorrt's CHANGELOG lists as added after 10.3 removed
(Blackman/Hamming/HannWindow 10.4, STFT 10.5, Attention 10.14, RotaryEmbedding,
RMSNormalization and TensorScatter 10.15), and TensorRT 10.0's declared opset range 9-20.
Only the restrictions that can bite a forward-mode dual graph are checked node by node.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper

TRT_VERSION = "10.3"
MIN_OPSET, MAX_OPSET = 9, 20

#: Operators the parser imports (TensorRT 10.3). Restrictions are checked separately below.
SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand
EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool
GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU
HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization
LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg
NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1
ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan
Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu
Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

#: Operators the matrix marks "N" that an exporter might plausibly emit, with a hint.
UNSUPPORTED_HINTS = {
    "NegativeLogLikelihoodLoss": "express the loss with LogSoftmax, Mul by one-hot labels and ReduceSum/ReduceMean",
    "SoftmaxCrossEntropyLoss": "express the loss with LogSoftmax, Mul by one-hot labels and ReduceSum/ReduceMean",
    "MaxUnpool": "rewrite as ScatterElements",
    "BitShift": "", "Bernoulli": "", "Col2Im": "", "Compress": "", "ConvInteger": "",
    "DFT": "", "Det": "", "DynamicQuantizeLinear": "", "MatMulInteger": "", "MaxRoiPool": "",
    "Multinomial": "", "QLinearConv": "", "QLinearMatMul": "", "Unique": "",
    "TfIdfVectorizer": "", "StringNormalizer": "", "AffineGrid": "", "CenterCropPad": "",
    "ImageDecoder": "", "MelWeightMatrix": "",
}
#: Sequence/Optional values have no TensorRT tensor type: every op on them is unsupported.
_VALUE_KIND_PREFIXES = ("Sequence", "Optional", "SplitToSequence", "ConcatFromSequence")
_CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
_DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})
#: Ops whose input 1 (axes/axis) the parser needs as a build-time constant.
_CONST_AXES_OPS = frozenset({
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Squeeze", "Unsqueeze", "CumSum",
})
_UNSUPPORTED_TYPES: dict[int, str] = {  # TensorProto.DataType value -> name
    TensorProto.STRING: "STRING", TensorProto.INT16: "INT16", TensorProto.UINT16: "UINT16",
    TensorProto.UINT32: "UINT32", TensorProto.UINT64: "UINT64",
    TensorProto.COMPLEX64: "COMPLEX64", TensorProto.COMPLEX128: "COMPLEX128",
}


@dataclass(frozen=True)
class TrtIssue:
    """One finding: ``error`` means the parser or builder will refuse the graph."""

    severity: str  # "error" | "warning"
    node: str      # node name ("" for graph-level findings)
    op_type: str
    message: str

    def __str__(self) -> str:
        where = f"{self.op_type} node '{self.node}'" if self.op_type else "graph"
        return f"[{self.severity}] {where}: {self.message}"


def check_trt_compat(model: onnx.ModelProto | str | Path) -> list[TrtIssue]:
    """Return all errors and warnings for building ``model`` with TensorRT 10's ONNX parser."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    issues = _check_opset(model)
    functions = {(f.domain, f.name): f for f in model.functions}
    issues += _check_graph(model.graph, functions, outer_consts=frozenset())
    issues += _check_io(model.graph)
    return issues


def _check_opset(model: onnx.ModelProto) -> list[TrtIssue]:
    versions = [o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS]
    if not versions:
        return [TrtIssue("error", "", "", "model imports no default-domain opset")]
    v = versions[0]
    if v < MIN_OPSET:
        return [TrtIssue("error", "", "", f"opset {v} is below TensorRT {TRT_VERSION}'s minimum {MIN_OPSET}")]
    if v > MAX_OPSET:
        return [TrtIssue("warning", "", "", f"opset {v} is above {MAX_OPSET}, the newest TensorRT 10.0-10.3 "
                                             "declare; export with opset <= 20 to be safe")]
    return []


def _constants(graph: onnx.GraphProto, outer: frozenset[str]) -> frozenset[str]:
    names = {t.name for t in graph.initializer}
    names |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return outer | names


def _check_graph(graph: onnx.GraphProto, functions: dict, outer_consts: frozenset[str]) -> list[TrtIssue]:
    consts = _constants(graph, outer_consts)
    inits = {t.name: t for t in graph.initializer}
    issues: list[TrtIssue] = []
    for node in graph.node:
        if node.domain not in _DEFAULT_DOMAINS:
            fn = functions.get((node.domain, node.op_type))
            if fn is None:
                issues.append(_err(node, f"custom domain '{node.domain}': TensorRT needs a plugin for it"))
            else:  # local functions are inlined by the parser (TensorRT >= 9)
                fn_graph = onnx.helper.make_graph(list(fn.node), fn.name, [], [])
                issues += _check_graph(fn_graph, functions, consts)
            continue
        issues += _check_node(node, consts, inits)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                issues += _check_graph(sub, functions, consts)
    return issues


def _err(node: onnx.NodeProto, msg: str) -> TrtIssue:
    return TrtIssue("error", node.name, node.op_type, msg)


def _warn(node: onnx.NodeProto, msg: str) -> TrtIssue:
    return TrtIssue("warning", node.name, node.op_type, msg)


def _check_node(node: onnx.NodeProto, consts: frozenset[str], inits: dict) -> list[TrtIssue]:
    op = node.op_type
    if op in UNSUPPORTED_HINTS or op.startswith(_VALUE_KIND_PREFIXES):
        hint = UNSUPPORTED_HINTS.get(op) or ""
        return [_err(node, f"not supported by TensorRT {TRT_VERSION}'s ONNX parser" + (f"; {hint}" if hint else ""))]
    if op not in SUPPORTED_OPS:
        return [_err(node, f"not in TensorRT {TRT_VERSION}'s ONNX operator support matrix")]
    if op in _CONTROL_FLOW:
        return [_warn(node, "control flow is supported with restrictions (static loop-carried shapes, "
                            "no dynamic scan outputs) and runs slowly; keep dual graphs straight-line")]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    issues: list[TrtIssue] = []
    if op in ("MaxPool", "AveragePool", "LpPool"):
        if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
            issues.append(_err(node, "the second output 'Indices' is unsupported; take the argmax "
                                     "another way (e.g. compare the input with the upsampled max)"))
        kernel = attrs.get("kernel_shape", [])
        if len(kernel) not in (2, 3):
            issues.append(_err(node, f"only 2D or 3D pooling is supported (kernel_shape {list(kernel)})"))
        if any(d != 1 for d in attrs.get("dilations", [])):
            issues.append(_err(node, "pooling 'dilations' must be empty or all ones"))
    elif op == "Dropout" and len(node.input) > 2 and node.input[2]:
        mode = inits.get(node.input[2])
        if mode is None or bool(numpy_helper.to_array(mode)):
            issues.append(_err(node, "'training_mode' must be an initializer that evaluates to False"))
    elif op == "LayerNormalization" and any(o for o in node.output[1:]):
        issues.append(_err(node, "only the first output 'Y' is supported"))
    elif op == "Constant" and set(attrs) & {"sparse_value", "value_string", "value_strings"}:
        issues.append(_err(node, "sparse and string constants are unsupported"))
    elif op == "Resize":
        if attrs.get("mode", b"nearest") not in (b"nearest", b"linear"):
            issues.append(_err(node, f"resize mode {attrs['mode'].decode()!r} unsupported (nearest, linear only)"))
        if attrs.get("antialias", 0):
            issues.append(_err(node, "antialiasing is not supported"))
    elif op == "ScatterND" and attrs.get("reduction", b"none") != b"none":
        issues.append(_err(node, "'reduction' other than 'none' is not supported"))
    if op in _CONST_AXES_OPS and len(node.input) > 1 and node.input[1] and node.input[1] not in consts:
        issues.append(_err(node, f"input '{node.input[1]}' (axes/axis) must be a build-time constant"))
    return issues


def _check_io(graph: onnx.GraphProto) -> list[TrtIssue]:
    issues: list[TrtIssue] = []
    for t in graph.initializer:
        issues += _check_type(t.name, t.data_type, "initializer")
    symbols: set[str] = set()
    init_names = {t.name for t in graph.initializer}
    for kind, values in (("input", [v for v in graph.input if v.name not in init_names]), ("output", graph.output)):
        for v in values:
            tt = v.type.tensor_type
            if not v.type.HasField("tensor_type"):
                issues.append(TrtIssue("error", "", "", f"graph {kind} '{v.name}' is not a tensor"))
                continue
            issues += _check_type(v.name, tt.elem_type, f"graph {kind}")
            if tt.elem_type == TensorProto.INT64:
                issues.append(TrtIssue("warning", "", "", f"graph {kind} '{v.name}' is INT64: TensorRT 10 binds it "
                                       "as INT64 (TensorRT < 9 cast INT64 to INT32) and some layers lack INT64 "
                                       "kernels; the asyncfgd runtime feeds float32"))
            if kind == "input":
                issues += _check_dynamic(v, symbols)
    if len(symbols) > 1:
        issues.append(TrtIssue("warning", "", "", f"several dynamic dim names {sorted(symbols)}: one optimisation "
                               "profile gives every dynamic dim the batch range; use one batch symbol"))
    return issues


def _check_type(name: str, elem_type: int, kind: str) -> list[TrtIssue]:
    if elem_type in _UNSUPPORTED_TYPES:
        return [TrtIssue("error", "", "", f"{kind} '{name}' has type {_UNSUPPORTED_TYPES[elem_type]}, "
                                          "which TensorRT does not support")]
    if elem_type == TensorProto.DOUBLE:
        return [TrtIssue("warning", "", "", f"{kind} '{name}' is DOUBLE: TensorRT casts it to FLOAT")]
    return []


def _check_dynamic(value: onnx.ValueInfoProto, symbols: set[str]) -> list[TrtIssue]:
    tt = value.type.tensor_type
    if not tt.HasField("shape"):
        return [TrtIssue("warning", "", "", f"graph input '{value.name}' has no shape: TensorRT needs static "
                                            "ranks and one dynamic (batch) dim")]
    dynamic = [(i, d.dim_param) for i, d in enumerate(tt.shape.dim) if not d.HasField("dim_value")]
    symbols.update(p for _, p in dynamic if p)
    if len(dynamic) > 1:
        axes = [i for i, _ in dynamic]
        return [TrtIssue("warning", "", "", f"graph input '{value.name}' has dynamic dims at axes {axes}: only "
                                            "the batch dim should be dynamic (one optimisation profile range)")]
    return []
