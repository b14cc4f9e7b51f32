"""``python -m sparsify_fx ...`` (what ``torchrun -m sparsify_fx prune ...`` runs)."""
from sparsify_fx.cli import main

raise SystemExit(main())
