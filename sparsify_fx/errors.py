"""One exception hierarchy for everything sparsify-fx raises on bad input.

Every message names the offending thing and says how to fix it.
"""
from __future__ import annotations


class SparsifyError(Exception):
    """Root of every error sparsify-fx raises deliberately."""


class InputError(SparsifyError, TypeError):
    """The object handed to an API function is not what it accepts."""


class ConfigError(SparsifyError, ValueError):
    """An option is unknown or out of range (method, granularity, s_init, ...)."""


class TraceError(SparsifyError):
    """torch.fx could not trace the model, nor any part of it that holds weights."""


class SelectionError(SparsifyError, ValueError):
    """include/exclude/keep_first/keep_last left no weight to prune."""


class FoldError(SparsifyError):
    """fold() was called on a model without masks (never transformed, or folded already)."""


class BudgetError(SparsifyError, ValueError):
    """A target sparsity or MACs budget cannot be met."""


class TargetNotAppliedError(FoldError, BudgetError):
    """fold/shrink/export of a model whose requested target was never cut exactly."""


class TrainingError(SparsifyError, RuntimeError):
    """Training diverged (NaN/inf loss) or was configured inconsistently."""


class ExportError(SparsifyError):
    """ONNX export or its verification in onnxruntime failed."""


class ShrinkError(SparsifyError):
    """Channel coupling analysis met a pattern it cannot shrink safely.

    When a capture shrunk into its source class does not run or differs from the
    hard-masked model (the class's code reads a width the shrink does not update),
    ``groups`` names the cut channel groups that cause it (``channel_group_<i>``) and
    ``exclude`` their producer weights: keep them whole with
    ``transform(model, ..., exclude=exc.exclude)`` and cut again. Both empty otherwise."""

    #: keys of the channel groups whose cut the source class cannot hold
    groups: tuple[str, ...] = ()
    #: their producer weights (``transform``'s ``exclude`` keeps them whole)
    exclude: tuple[str, ...] = ()


class GenerationMismatchError(ExportError):
    """An exported decoder's greedy tokens or step logits differ from PyTorch's generate()."""
