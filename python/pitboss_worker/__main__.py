"""``python -m pitboss_worker --adapter MODULE:OBJECT [--max-frame-bytes N] [--concurrency N]``"""

import sys

from .runtime import main

sys.exit(main())
