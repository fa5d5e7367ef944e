"""``python -m objectives.evaluate``: an alias of :mod:`hpo.evaluate`, the one evaluation entry point.

The command lives in ``hpo/`` because with ``--study`` it reads a study's storage;
this alias keeps the original command line working.
"""

import sys

from hpo.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
