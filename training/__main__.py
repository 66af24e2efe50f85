"""`python -m training` (also under `accelerate launch -m training` and `torchrun -m training`)."""

import sys

from .cli import main

sys.exit(main())
