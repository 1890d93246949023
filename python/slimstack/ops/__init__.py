"""Sparse linear algebra on packed weights: dispatch, custom ops, SparseLinear.

``sparse_linear(x, packed, bias)`` picks a backend (CUDA extension, Triton, PyTorch
semi-structured, CPU extension, pure PyTorch) from ``dispatch``'s table; importing this
package registers the ``slimstack::*`` torch.library custom ops.
"""

from slimstack.ops.backends import available_backends
from slimstack.ops.dense_linear import DenseLinear, dense_linear
from slimstack.ops.dispatch import choose_backend
from slimstack.ops.sparse_linear import SparseLinear, sparse_linear
from slimstack.ops.sparsify import SparsifyReport, sparsify_model

__all__ = [
    "DenseLinear",
    "SparseLinear",
    "SparsifyReport",
    "available_backends",
    "choose_backend",
    "dense_linear",
    "sparse_linear",
    "sparsify_model",
]
