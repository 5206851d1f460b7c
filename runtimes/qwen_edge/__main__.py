"""`python -m qwen_edge`: the `qwen-edge` command."""

import sys

from .cli import main

sys.exit(main())
