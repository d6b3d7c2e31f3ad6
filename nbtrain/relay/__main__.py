"""`python -m nbtrain.relay RUN_DIR --ranks 2,3`: the remote side of a relay (see nbtrain.relay.remote)."""

import sys

from nbtrain.relay.remote import main

sys.exit(main())
