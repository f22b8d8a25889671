"""``python -m nirslake.cli``: the ``nirslake`` command run by module name."""

import sys

from . import main

sys.exit(main())
