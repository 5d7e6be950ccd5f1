"""``python -m ctm_kernels``: the ``ctm`` command."""
import sys

from .cli import main

sys.exit(main())
