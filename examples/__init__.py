"""Example models and recipes for ``sparsify-fx prune`` (see docs/cli.md)."""
