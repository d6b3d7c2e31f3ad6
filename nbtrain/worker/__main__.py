"""`python -m nbtrain.worker RUN_DIR RANK`: one worker process of a run."""

import sys
from pathlib import Path

from nbtrain.worker.entry import main

sys.exit(main(Path(sys.argv[1]), int(sys.argv[2])))
