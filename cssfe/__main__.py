"""``python -m cssfe COMMAND [ARGS ...]``: the ``cssfe`` command (``cssfe.cli``)."""
import sys

from cssfe.cli import main

if __name__ == "__main__":
    sys.exit(main())
