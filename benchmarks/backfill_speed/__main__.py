"""``python -m benchmarks.backfill_speed [options]``: see `benchmarks.backfill_speed.run`."""

import sys

from benchmarks.backfill_speed.run import main

sys.exit(main())
