"""The precision a model actually computes in on an ONNX Runtime provider, read from ORT's optimized graph.

A variant's file says what its tensors are stored as, not what runs: ORT's CPU provider has no fp16 kernels for
most ops on x86, so it inserts Casts to fp32 around them (or constant-folds the fp16 weights back to fp32) and the
"fp16" model computes in fp32 with fp16-rounded weights — slower than fp32 and no smaller in memory at run time.
A QDQ model computes in int8 only where ORT fused DequantizeLinear→op→QuantizeLinear into an integer kernel.

:func:`computed_precision` opens a session on the provider with the optimized graph saved
(``optimized_model_filepath``), follows the element type of every tensor through it and counts the compute nodes
by the precision they compute in.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from kdpipe.exporters.variants import _quiet_ort

#: integer kernels ORT's CPU provider runs for QDQ / dynamically quantised graphs
INT8_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "DynamicQuantizeLinear", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
    "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QAttention",
})  # fmt: skip
#: nodes that do arithmetic worth counting (layout, casts and (de)quantisation are not)
COMPUTE_OPS = frozenset({
    "Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "Add", "Mul", "Sub", "Div",
    "GlobalAveragePool", "AveragePool", "MaxPool", "ReduceMean", "Relu", "Clip", "Max", "Sigmoid", "HardSigmoid",
    "HardSwish", "Softmax", "LayerNormalization", "BatchNormalization", "Gelu", "FastGelu", "BiasGelu", "Erf", "Tanh",
}) | INT8_OPS  # fmt: skip
_NAMES = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16",
          onnx.TensorProto.DOUBLE: "fp64", onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT8: "int8"}  # fmt: skip


def optimized_graph(path: Path, provider: str = "CPUExecutionProvider") -> onnx.ModelProto:
    """The graph ``provider`` runs at ORT_ENABLE_ALL (the level the benchmark and the edge runner use)."""
    with tempfile.TemporaryDirectory(prefix="kdpipe-opt-") as tmp, _quiet_ort():
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), sess_options=options, providers=[provider])
        return onnx.load(options.optimized_model_filepath)


def _elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    """Element type of every tensor: declared where the graph says, else propagated from the producer."""
    types = {t.name: t.data_type for t in graph.initializer}
    types.update({v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]})
    for node in graph.node:  # optimized graphs are topologically sorted
        if node.op_type == "Cast":
            out = next(a.i for a in node.attribute if a.name == "to")
        elif node.op_type in ("QuantizeLinear", "DynamicQuantizeLinear"):
            zero_point = node.input[2] if len(node.input) > 2 else ""
            out = types.get(zero_point, onnx.TensorProto.UINT8)
        elif node.op_type == "DequantizeLinear":
            out = types.get(node.input[1], onnx.TensorProto.FLOAT)
        else:
            known = [types[i] for i in node.input if i in types]
            floats = [t for t in known if t in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
            out = (floats or known or [onnx.TensorProto.FLOAT])[0]
        for name in node.output:
            types.setdefault(name, out)
    return types


def computed_precision(path: Path, provider: str = "CPUExecutionProvider") -> dict[str, Any]:
    """Count ``path``'s compute nodes on ``provider`` by the precision they compute in.

    Returns:
        ``{"provider", "nodes": {"int8": n, "fp16": n, "fp32": n, ...}, "casts": n, "computes_in"}`` where
        ``computes_in`` is the precision of the Conv/Gemm/MatMul-class kernels (``"mixed: int8+fp32"`` when they
        differ), the figure that decides speed.
    """
    graph = optimized_graph(Path(path), provider).graph
    types = _elem_types(graph)
    counts: Counter[str] = Counter()
    heavy: Counter[str] = Counter()
    for node in graph.node:
        if node.op_type not in COMPUTE_OPS:
            continue
        if node.op_type in INT8_OPS:
            kind = "int8"
        else:
            first = next((types[i] for i in node.input if i in types), onnx.TensorProto.FLOAT)
            kind = _NAMES.get(first, str(first))
        counts[kind] += 1
        if any(k in node.op_type for k in ("Conv", "Gemm", "MatMul")):
            heavy[kind] += 1
    kinds = sorted(heavy or counts)
    casts = sum(1 for n in graph.node if n.op_type == "Cast")
    return {"provider": provider, "nodes": dict(sorted(counts.items())), "casts": casts,
            "computes_in": kinds[0] if len(kinds) == 1 else "mixed: " + "+".join(kinds)}  # fmt: skip


def safe_precision(path: Path, provider: str) -> dict[str, Any] | None:
    """:func:`computed_precision`, or None when the provider cannot open the file (reported, never fatal)."""
    with contextlib.suppress(Exception):
        return computed_precision(path, provider)
    return None
