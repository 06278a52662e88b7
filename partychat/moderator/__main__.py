"""``python -m partychat.moderator``: the console, as ``moderator.py`` and ``partychat-moderator`` start it."""

import sys

from .cli import main

sys.exit(main())
