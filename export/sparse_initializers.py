"""Rewrite an ONNX graph's dense initializers into COO ``graph.sparse_initializer``.

ONNX stores a sparse tensor as ``SparseTensorProto(values, indices, dims)``.
Here ``values`` is a 1-D tensor of the nonzeros that keeps the weight's name
(so every node that read the dense initializer reads the sparse one) and
``indices`` is a 1-D int64 tensor of *linear* (row-major) positions. One
nonzero costs ``itemsize + 8`` bytes against ``itemsize`` per element dense,
so for float32 the sparse form is smaller only above 2/3 sparsity.

:func:`sparsify_initializers` mutates the ``ModelProto`` it is given.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

#: bytes of one int64 linear index
INDEX_BYTES = 8


@dataclass(frozen=True)
class InitializerStorage:
    """How one initializer ended up stored in the exported file.

    ``storage``: ``"sparse"`` or ``"dense"``; ``reason`` says why it stayed dense.
    ``sparsity``: fraction of exact zeros; ``bytes``: payload bytes as stored
    (values + indices for sparse, raw data for dense); ``dense_bytes``: payload
    bytes of the dense form.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    storage: str
    sparsity: float
    bytes: int
    dense_bytes: int
    reason: str = ""


def coo_bytes(nonzeros: int, itemsize: int) -> int:
    """Payload bytes of a COO tensor with int64 linear indices."""
    return nonzeros * (itemsize + INDEX_BYTES)


def _to_sparse(name: str, array: np.ndarray, data_type: int) -> onnx.SparseTensorProto:
    flat = array.reshape(-1)
    indices = np.flatnonzero(flat).astype(np.int64)
    values = numpy_helper.from_array(np.ascontiguousarray(flat[indices]), name=name)
    values.data_type = data_type  # keep e.g. bfloat16 as declared by the exporter
    index_tensor = numpy_helper.from_array(indices, name=f"{name}__coo_indices")
    return onnx.helper.make_sparse_tensor(values, index_tensor, list(array.shape))


def sparsify_initializers(model: onnx.ModelProto, min_sparsity: float = 0.5, *,
                          only_if_smaller: bool = True) -> list[InitializerStorage]:
    """Move sparse initializers of ``model.graph`` into ``graph.sparse_initializer``.

    An initializer moves when its fraction of zeros is ``>= min_sparsity`` and,
    with ``only_if_smaller`` (default), when COO storage is strictly smaller
    than dense storage. Initializers that are also graph inputs (overridable
    defaults), scalars and non-numeric ones stay dense. ``value_info`` entries naming a
    moved initializer are removed (they conflict with the sparse form).
    External data must be loaded into the model before calling this.
    Mutates ``model``; returns one :class:`InitializerStorage` per initializer,
    sparse ones included, in graph order.
    """
    graph = model.graph
    graph_inputs = {i.name for i in graph.input}
    report: list[InitializerStorage] = []
    keep: list[onnx.TensorProto] = []
    moved: set[str] = set()
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        itemsize = np.dtype(dtype).itemsize
        numel = int(array.size)
        zeros = numel - int(np.count_nonzero(array)) if array.dtype.kind in "biufc" else 0
        sparsity = zeros / numel if numel else 0.0
        dense = numel * itemsize
        sparse = coo_bytes(numel - zeros, itemsize)
        shape = tuple(int(d) for d in init.dims)
        reason = ""
        if array.dtype.kind not in "biufc":
            reason = "non-numeric"
        elif not shape:
            reason = "scalar"  # ONNX sparse tensors need rank >= 1
        elif init.name in graph_inputs:
            reason = "graph input"
        elif numel == 0 or sparsity < min_sparsity:
            reason = "below min_sparsity"
        elif only_if_smaller and sparse >= dense:
            reason = "COO would be larger"
        if reason:
            keep.append(init)
            report.append(InitializerStorage(init.name, shape, str(np.dtype(dtype)), "dense",
                                             sparsity, dense, dense, reason))
            continue
        graph.sparse_initializer.append(_to_sparse(init.name, array, init.data_type))
        moved.add(init.name)
        report.append(InitializerStorage(init.name, shape, str(np.dtype(dtype)), "sparse",
                                         sparsity, sparse, dense))
    if moved:
        del graph.initializer[:]
        graph.initializer.extend(keep)
        kept_info = [v for v in graph.value_info if v.name not in moved]
        del graph.value_info[:]
        graph.value_info.extend(kept_info)
    return report


def coo_lower_bound(model: onnx.ModelProto) -> int:
    """Smallest file this COO format allows for ``model`` (a dense, unconverted model).

    The graph's non-initializer bytes plus, per initializer, the smaller of its
    dense payload and ``nonzeros * (itemsize + 8)``: the floor any file with
    int64-linear-index COO can reach (protobuf framing aside).
    """
    dense_total = 0
    best = 0
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        itemsize = array.dtype.itemsize
        dense = array.size * itemsize
        dense_total += dense
        best += min(dense, coo_bytes(int(np.count_nonzero(array)), itemsize))
    return model.ByteSize() - dense_total + best
