"""Hidden entry for the cold-start child: `python -m bertedge.toolchain.bench _cold-start SPEC_JSON`."""

import sys

from bertedge.toolchain.bench.coldstart import main

sys.exit(main(sys.argv[1:]))
