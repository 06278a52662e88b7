"""``python -m partychat.persona``: model personas, as ``client.py`` and ``partychat-client`` start them."""

import sys

from .cli import main

sys.exit(main())
