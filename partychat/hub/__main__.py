"""``python -m partychat.hub``: the hub, as ``server.py`` and the ``partychat-server`` command start it."""

import sys

from .cli import main

sys.exit(main())
