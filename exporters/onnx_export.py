"""Export a classifier to a single self-contained ONNX file.

Both torch exporters are supported: ``"dynamo"`` (``torch.export`` based, the default since torch 2.9) and
``"torchscript"`` (the legacy tracer). Either way the result has one input ``input`` and one output ``logits`` with a
dynamic batch axis, is validated with the ONNX checker and carries the caller's metadata as ``metadata_props``.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from kdpipe.fileio import atomic_path

EXPORTERS = ("dynamo", "torchscript")


def export_onnx(
    model: nn.Module,
    path: Path,
    example: torch.Tensor,
    opset: int = 18,
    exporter: str = "dynamo",
    metadata: dict[str, str] | None = None,
) -> dict:
    """Export ``model`` to ``path`` as one ONNX file with a dynamic batch axis.

    Args:
        model: The network; it is put in eval mode.
        path: Destination ``.onnx`` file. Parent directories are created.
        example: An example input batch (N, ...). Only its shape and dtype matter.
        opset: ONNX opset version.
        exporter: ``"dynamo"`` or ``"torchscript"``.
        metadata: String key/values stored as the model's ``metadata_props``.

    Returns:
        ``{"file", "bytes", "opset", "exporter", "parameters"}``.

    Raises:
        ValueError: ``exporter`` is not one of :data:`EXPORTERS`.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = _sidecar(path)
    sidecar.unlink(missing_ok=True)  # a stale one from an earlier export would be mistaken for ours

    model.eval()
    if example.shape[0] == 1:
        # torch.export may specialise a size-1 dimension to the constant 1; trace with 2 to keep the axis symbolic.
        example = example.expand(2, *example.shape[1:]).contiguous()
    kwargs: dict = {
        "dynamo": exporter == "dynamo",
        "opset_version": opset,
        "input_names": ["input"],
        "output_names": ["logits"],
    }
    if exporter == "dynamo":
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1)},)
        kwargs["external_data"] = False
    else:
        kwargs["dynamic_axes"] = {"input": {0: "batch"}, "logits": {0: "batch"}}

    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), **kwargs)

    proto = onnx.load(str(path), load_external_data=True)
    if sidecar.exists():
        # Should not happen with external_data=False, but never leave a file that depends on a sidecar.
        sidecar.unlink()
    if metadata:
        _set_metadata(proto, metadata)
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)

    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "opset": opset,
        "exporter": exporter,
        "parameters": _initializer_count(proto.graph),
    }


def _set_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> None:
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)


def stamp_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Replace the metadata_props of the ONNX file at ``path`` (atomically)."""
    proto = onnx.load(str(path))
    _set_metadata(proto, metadata)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))


def onnx_parameter_count(path: Path) -> int:
    """Return the number of floating-point values held in the graph initializers of the ONNX file at ``path``."""
    return _initializer_count(onnx.load(str(path), load_external_data=False).graph)


_FLOAT_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.DOUBLE,
    }
)


def _initializer_count(graph: onnx.GraphProto) -> int:
    """Sum of numel over floating-point initializers.

    Integer initializers are skipped: the dynamo exporter stores shape constants (e.g. the int64 target shape of a
    flatten's Reshape) as initializers, which are not parameters and would make the count exporter-dependent.
    """
    return int(
        sum(int(np.prod(init.dims, dtype=np.int64)) for init in graph.initializer if init.data_type in _FLOAT_TYPES)
    )


def _sidecar(path: Path) -> Path:
    """The external-data file the dynamo exporter would write next to ``path``."""
    return path.with_name(path.name + ".data")
