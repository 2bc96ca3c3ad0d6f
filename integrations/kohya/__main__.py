"""``python -m smplora_plugin.integrations.kohya`` (also ``accelerate launch -m ...``)."""

import sys

from .launcher import main

if __name__ == "__main__":
    sys.exit(main())
