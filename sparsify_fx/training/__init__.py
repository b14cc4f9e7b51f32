"""Training: learning the masks of a transformed model.

Holds :mod:`.trainer` (``Trainer``, ``evaluate``, resume, ticket-search rounds),
:mod:`.cs_scheduler` (Continuous Sparsification: beta annealing, L1 penalty on
the soft mask, ``param_groups``), :mod:`.density_controller` (lambda control
toward a target density, shared by CS and L0) and :mod:`.checkpoint` (atomic
checkpoint files, named load errors).

May import: the core modules, ``methods``, ``budgets`` (the exact cut at the end of
a run) and ``sparsify_fx.passes``; never ``export`` or ``cli``.
"""
