"""``python -m tracewire.cli``: the same as the ``tracewire`` command."""

import sys

from tracewire.cli import main

if __name__ == "__main__":
    sys.exit(main())
