#!/usr/bin/env python3
"""Party Chat hub: python server.py --help"""

import sys

from partychat.server_cli import main

if __name__ == "__main__":
    sys.exit(main())
