"""Old flat module paths of ``sparsify_fx.passes`` kept importable.

Until the passes were split into sub-packages, every pass was a module directly under
``sparsify_fx.passes`` (``sparsify_fx.passes.shrink_source``, ...). Users' imports and
pickled GraphModules name those paths, so a meta-path finder maps each old name to
the module that now holds it: the same module object, not a copy.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

#: old module path -> the module that holds its code now
MOVED: dict[str, str] = {
    "sparsify_fx.passes." + old: "sparsify_fx." + new for old, new in {
        "trace": "capture.fx_trace",
        "capture_export": "capture.export_modes",
        "rng_guard": "capture.rng_guard",
        "find_weights": "passes.masks.find_weights",
        "insert_masks": "passes.masks.insert_masks",
        "parametrize_weights": "passes.masks.parametrize_weights",
        "fold_masks": "passes.masks.fold_masks",
        "channel_analysis": "passes.channels.analysis",
        "channel_layout_rules": "passes.channels.layout_rules",
        "channel_types": "passes.channels.graph_types",
        "attention_heads": "passes.channels.attention_heads",
        "couple_channels": "passes.channels.couple",
        "aten_channel_walk": "passes.aten.channel_walk",
        "aten_producers": "passes.aten.producers",
        "aten_elementwise": "passes.aten.elementwise",
        "aten_values": "passes.aten.values",
        "shrink_attention": "passes.shrink.attention",
        "pruned_attention": "passes.shrink.pruned_attention",
        "shrink_source": "passes.shrink.to_source",
        "shrink_config": "passes.shrink.hf_config",
        "count_macs": "passes.macs.count",
        "macs_tally": "passes.macs.tally",
    }.items()
}
# ``sparsify_fx.passes.shrink`` is now the shrink package: it re-exports the old
# module's names itself (see passes/shrink/__init__.py).


class _MovedModuleLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        """The target module has already run; nothing to execute."""


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _MovedModuleLoader(new))


def install_moved_module_finder() -> None:
    """Put the finder on ``sys.meta_path`` once (idempotent)."""
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
