"""``python -m gluon_optim.lab.bench``: the same as ``gluon-optim bench``."""

from gluon_optim.lab.bench.command import main

raise SystemExit(main())
