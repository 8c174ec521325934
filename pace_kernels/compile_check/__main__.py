"""``python -m pace_kernels.compile_check``."""

import sys

from . import main

sys.exit(main())
