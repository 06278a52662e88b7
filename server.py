#!/usr/bin/env python3
"""Party Chat hub: python server.py --help"""

import sys

from partychat.hub.cli import main

if __name__ == "__main__":
    sys.exit(main())
