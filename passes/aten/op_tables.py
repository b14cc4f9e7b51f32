"""Op tables of the ATen channel walk (:mod:`~sparsify_fx.passes.aten.channel_walk`):
which ATen op names each rule handles. Plain data."""
from __future__ import annotations

#: ops that only move data: applied to the id and zero tensors as they are
SHAPE_OPS = {"view", "_unsafe_view", "reshape", "transpose", "permute", "t", "expand", "unsqueeze",
             "squeeze", "slice", "select", "cat", "concat", "stack", "split", "split_with_sizes",
             "chunk", "unbind", "clone", "contiguous", "alias", "detach", "flatten", "unflatten",
             "repeat", "narrow", "movedim", "roll", "flip", "lift_fresh_copy", "expand_as",
             "view_as", "reshape_as", "unsafe_split", "tensor_split", "repeat_interleave",
             "concatenate"}
#: identity on ids (dtype or device changes, dropout in eval form)
IDENTITY_OPS = {"to", "_to_copy", "type_as", "_assert_tensor_metadata", "dropout", "feature_dropout",
                "alpha_dropout", "detach_"}
#: ops that leave a weight as it is (a weight read through them is still a producer's)
PARAM_COPY_OPS = IDENTITY_OPS | {"clone", "contiguous", "detach", "alias", "lift_fresh_copy"}
#: views of a weight that may only drop or insert size-1 dims (checked per node; a
#: ``slice`` of the whole dim, as ``A[None, :]`` records it, keeps the shape)
PARAM_UNIT_DIM_OPS = {"squeeze", "unsqueeze", "view", "_unsafe_view", "reshape", "slice"}
#: 2-D transposes of a weight (``W.t()``, ``W.T``, ``W.transpose(0, 1)``, ``W.permute(1, 0)``)
PARAM_TRANSPOSE_OPS = {"t", "numpy_T", "transpose", "permute", "mT", "mH", "adjoint"}
#: f(0) == 0 elementwise
ZERO_KEEPING = {"neg", "relu", "relu_", "gelu", "silu", "silu_", "tanh", "abs", "erf", "sqrt",
                "hardtanh", "leaky_relu", "hardswish", "elu", "mish", "sin", "relu6", "dropout",
                "native_dropout", "sign", "celu", "selu", "gelu_", "hardtanh_", "sgn", "square",
                "softsign", "tanhshrink", "hardshrink", "softshrink", "sinh", "asinh", "atanh",
                "tan", "atan", "asin", "trunc", "round", "floor", "ceil", "frac", "erfinv",
                "expm1", "log1p", "square_", "mish_"}
#: elementwise, f(0) != 0
NONZERO_UNARY = {"sigmoid", "exp", "cos", "rsqrt", "log", "hardsigmoid", "softplus", "reciprocal",
                 "erfc", "cosh", "bitwise_not", "logical_not", "clamp", "clamp_min",
                 "clamp_max", "nan_to_num", "fill", "zeros_like", "ones_like", "full_like",
                 "empty_like", "rand_like", "randn_like", "log_sigmoid"}
BINARY = {"add", "sub", "rsub", "mul", "div", "where", "maximum", "minimum", "pow", "masked_fill",
          "true_divide", "floor_divide", "fmod", "remainder", "atan2", "copysign", "hypot",
          "gt", "lt", "ge", "le", "eq", "ne", "logical_and", "logical_or", "logical_xor"}
REDUCE = {"sum", "mean", "amax", "amin", "max", "min", "var", "std", "var_mean", "logsumexp",
          "norm", "linalg_vector_norm", "prod", "argmax", "argmin", "any", "all"}
NORMALIZE = {"_softmax", "softmax", "_log_softmax", "log_softmax", "layer_norm", "native_layer_norm",
             "rms_norm", "_fused_rms_norm", "group_norm", "native_group_norm", "cumsum"}
#: ops whose result carries no channel (sizes, uninitialised tensors of a given shape)
NO_CHANNELS = {"sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "new_empty",
               "new_empty_strided"}
#: fresh tensors of one value everywhere (a scan's zero initial state)
UNIFORM_OPS = {"zeros", "ones", "full", "new_zeros", "new_ones", "new_full", "scalar_tensor"}
MATMUL = {"matmul", "mm", "bmm", "linear", "addmm", "baddbmm"}
CONV = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution"}
BATCH_NORM = {"batch_norm", "native_batch_norm", "_native_batch_norm_legit",
              "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional"}
SDPA = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention"}

__all__ = ["SHAPE_OPS", "IDENTITY_OPS", "PARAM_COPY_OPS", "PARAM_TRANSPOSE_OPS", "PARAM_UNIT_DIM_OPS", "ZERO_KEEPING", "NONZERO_UNARY", "BINARY", "REDUCE", "NORMALIZE", "NO_CHANNELS", "UNIFORM_OPS", "MATMUL", "CONV", "BATCH_NORM", "SDPA"]
