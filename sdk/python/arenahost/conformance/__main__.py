"""``python -m arenahost.conformance PLUGIN_DIR``: run the conformance suite without Go."""

import sys

from arenahost.conformance.runner import main

sys.exit(main())
