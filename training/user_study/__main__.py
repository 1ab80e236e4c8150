"""``python -m training.user_study``: see ``training/user_study/cli.py``."""

import sys

from training.user_study.cli import main

sys.exit(main())
