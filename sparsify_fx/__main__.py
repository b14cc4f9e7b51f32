"""``python -m sparsify_fx ...`` (what ``torchrun -m sparsify_fx prune ...`` runs)."""
from .cli import main

raise SystemExit(main())
