"""``python -m sparsify_fx.cli ...``: the same as ``sparsify-fx ...``."""
from sparsify_fx.cli import main

raise SystemExit(main())
