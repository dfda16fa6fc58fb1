"""Hidden entry for the cold-start child: `python -m bertedge.build.bench _cold-start SPEC_JSON`."""

import sys

from bertedge.build.bench.coldstart import main

sys.exit(main(sys.argv[1:]))
