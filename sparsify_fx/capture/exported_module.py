"""``ExportedModule``: a model captured by torch.export, runnable in train and eval mode.

An exported graph is fixed to the mode it was captured in, and the
GraphModule ``ExportedProgram.module()`` returns refuses ``.train()`` /
``.eval()``. sparsify-fx captures the model twice instead (once per mode,
:func:`sparsify_fx.capture.export_modes.export_both_modes`) and keeps both
graphs here:

* ``train_graph`` and ``eval_graph`` share every parameter, buffer and mask
  module (the same tensor objects), so training through one is seen by the
  other, and batch-norm running statistics updated in train mode are used in
  eval mode;
* ``forward`` runs the graph of the current mode; ``.train()`` / ``.eval()``
  switch it (and every mask's flag), like any ``nn.Module``;
* ``state_dict`` lists each tensor once, under ``train_graph.`` (the eval
  graph's duplicate keys are dropped, and not expected when loading);
* ``.to()`` / ``.cuda()`` / ``.half()`` move the shared tensors once and
  re-bind the eval graph to them.

Not supported: pickling the whole module (``torch.save(model)``); save
``state_dict()`` instead.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Sequence

from torch import fx, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from sparsify_fx.errors import TraceError

EVAL_PREFIX = "eval_graph."


def _drop_eval_keys(module: nn.Module, state_dict: dict, prefix: str, _meta: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + EVAL_PREFIX)]:
        del state_dict[key]


def _ignore_eval_missing(module: nn.Module, incompatible: Any) -> None:
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if EVAL_PREFIX not in k]


class ExportedModule(nn.Module):
    """Train- and eval-mode torch.export graphs of one model, sharing all state.

    ``forward(*args, **kwargs)`` takes the source model's example arguments
    (same positional structure; dynamic dims as captured) and returns what the
    source model returns. Inputs captured by keyword may be passed by keyword or
    positionally in ``input_names`` order (bound to the keywords here).
    ``input_names``: the captured inputs, positional first (``n_args`` of them),
    then keywords; ``dynamic_dims``: input name -> dims the capture holds dynamic.
    """

    #: parameters are named ``train_graph.<name in the source model>``; reports strip this
    logical_name_prefix = "train_graph."

    def __init__(self, train_graph: fx.GraphModule, eval_graph: fx.GraphModule,
                 source_name: str = "", input_names: Sequence[str] = (), n_args: int = 0,
                 dynamic_dims: Mapping[str, tuple[int, ...]] | None = None) -> None:
        super().__init__()
        self.train_graph = train_graph
        self.eval_graph = eval_graph
        self.source_name = source_name
        self.input_names = tuple(input_names)
        self.n_args = int(n_args) if input_names else -1  # -1: unknown, pass calls through
        self.dynamic_dims = dict(dynamic_dims or {})
        self.register_state_dict_post_hook(_drop_eval_keys)
        self.register_load_state_dict_post_hook(_ignore_eval_missing)
        self.share_state()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if is_fx_symbolic_tracing():
            raise TraceError(
                f"{type(self).__name__} holds torch.export graphs and cannot be traced "
                "again by torch.fx; call it directly or trace `.eval_graph`")
        graph = self.train_graph if self.training else self.eval_graph
        if 0 <= self.n_args < len(self.input_names):  # keywords captured: pass them so
            args, kwargs = self._as_captured(args, kwargs)
        return graph(*args, **kwargs)

    def _as_captured(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Positional arguments past the captured positional ones -> their keywords."""
        if len(args) <= self.n_args:
            return args, kwargs
        names = self.input_names[self.n_args:]
        extra = args[self.n_args:]
        if len(extra) > len(names):
            raise TypeError(f"{type(self).__name__} takes {len(self.input_names)} inputs "
                            f"({', '.join(self.input_names)}), got {len(args) + len(kwargs)}")
        bound = dict(zip(names, extra))
        twice = [k for k in bound if k in kwargs]
        if twice:
            raise TypeError(f"{type(self).__name__} got {twice[0]!r} positionally and by keyword")
        return args[:self.n_args], {**bound, **kwargs}

    def train(self, mode: bool = True) -> "ExportedModule":
        """Switch mode: sets ``training`` on every submodule (the graphs refuse ``.train()``)."""
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        for module in self.modules():
            module.training = mode
        return self

    def share_state(self) -> None:
        """Point every parameter and buffer of ``eval_graph`` at ``train_graph``'s tensor
        of the same name (mutates ``eval_graph``; a no-op while they are shared)."""
        params = dict(self.train_graph.named_parameters(remove_duplicate=False))
        buffers = dict(self.train_graph.named_buffers(remove_duplicate=False))
        for path, module in self.eval_graph.named_modules(remove_duplicate=False):
            prefix = f"{path}." if path else ""
            for name in list(module._parameters):
                shared = params.get(prefix + name)
                if shared is not None and module._parameters[name] is not shared:
                    module._parameters[name] = shared
            for name in list(module._buffers):
                shared = buffers.get(prefix + name)
                if shared is not None and module._buffers[name] is not shared:
                    module._buffers[name] = shared

    def _apply(self, fn: Callable, recurse: bool = True) -> "ExportedModule":
        super()._apply(fn, recurse)
        self.share_state()
        return self

    def extra_repr(self) -> str:
        return f"source={self.source_name!r}, mode={'train' if self.training else 'eval'}"


def wrap_exported(train_graph: fx.GraphModule, eval_graph: fx.GraphModule,
                  source: nn.Module, input_names: Sequence[str] = (), n_args: int = 0,
                  dynamic_dims: Mapping[str, tuple[int, ...]] | None = None) -> ExportedModule:
    """An :class:`ExportedModule` whose ``forward`` shows the exported signature.

    ``torch.export`` / ``torch.onnx.export`` bind example inputs by the
    signature of ``forward``; the class made here gives ``forward`` the
    positional parameters of ``eval_graph.forward`` (the source model's names).
    ``input_names``/``n_args``/``dynamic_dims``: what was captured (see
    :class:`ExportedModule`).
    """
    signature = inspect.signature(type(eval_graph).forward)

    def forward(self: ExportedModule, *args: Any, **kwargs: Any) -> Any:
        return ExportedModule.forward(self, *args, **kwargs)

    forward.__signature__ = signature  # type: ignore[attr-defined]
    name = f"Exported{type(source).__name__}"
    cls = type(name, (ExportedModule,), {"forward": forward, "__module__": __name__})
    return cls(train_graph, eval_graph, type(source).__name__, input_names, n_args, dynamic_dims)


__all__ = ["ExportedModule", "wrap_exported"]
