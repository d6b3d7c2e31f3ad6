"""`python -m nbtrain.worker RUN_DIR [RANK]`: one worker process (RANK from the environment if not given)."""

import sys
from pathlib import Path

from nbtrain.worker.entry import main

sys.exit(main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else None))
