"""Stop, with a message, when `easydistill` resolves to another package than this one (a v1 checkout).

`python -m` puts the working folder first on Python's path, so inside an EasyDistill v1 checkout `import
easydistill` finds v1's own easydistill/ folder. Modules v1 lacks can still be found here (an editable install
finds them by name), and then fail on v1's names (`cannot import name 'config_parser' from 'easydistill.cli'`).
Every command imports this module first: the check runs once, at import, before any other name is used.
"""

from __future__ import annotations

import os
import sys

import easydistill

EXIT_USER_ERROR = 2  # as cli.EXIT_USER_ERROR, which cannot be imported while the package is someone else's

_ours = os.path.dirname(os.path.realpath(__file__))
_imported = getattr(easydistill, "__file__", None)
if _imported is None or os.path.dirname(os.path.realpath(_imported)) != _ours:
    found = os.path.dirname(os.path.realpath(_imported)) if _imported else list(easydistill.__path__)
    print(
        f"error: `import easydistill` found {found}, not this easydistill ({_ours}): a folder named "
        "easydistill in the working directory (an EasyDistill v1 checkout?) comes first on Python's path under "
        "`python -m`. Run the `easydistill --config FILE` command instead (it is not affected), or run from "
        "another folder (relative paths in the config are read from the working directory).",
        file=sys.stderr,
    )
    sys.exit(EXIT_USER_ERROR)
