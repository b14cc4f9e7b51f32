"""torch.fx graph passes: trace, find prunable weights, insert/parametrize masks,
channel coupling and shrinking. Nothing here imports ``sparsify_fx.export``."""
