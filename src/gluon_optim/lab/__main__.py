"""``python -m gluon_optim.lab``: the ``gluon-optim`` command (also what torchrun runs)."""

from gluon_optim.lab.cli import main

raise SystemExit(main())
