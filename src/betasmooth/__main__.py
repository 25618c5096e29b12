"""``python -m betasmooth`` and ``torchrun -m betasmooth``: the command line."""

from .cli import main

raise SystemExit(main())
