"""``python -m pitboss_worker --adapter MODULE:OBJECT [--max-frame-bytes N] [--concurrency N]``"""

import sys

from .cli import main

sys.exit(main())
