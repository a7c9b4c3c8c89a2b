"""The ``gluon-optim`` console script: the lab's command line, or one clear line without it.

The library installs without the lab's dependencies (numpy, scikit-learn, matplotlib); the
script then says how to get them instead of ending in a traceback.
"""

from __future__ import annotations

import sys


def main() -> int:
    """Run :func:`gluon_optim.lab.cli.main`, or explain the missing ``lab`` extra."""
    try:
        from gluon_optim.lab.cli import main as cli_main
    except ModuleNotFoundError as exc:
        print(
            f"gluon-optim: error: the lab needs {exc.name!r}, which is not installed; "
            "install the lab extra: pip install 'gluon-optim[lab]'",
            file=sys.stderr,
        )
        return 2
    return cli_main()
