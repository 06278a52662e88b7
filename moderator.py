#!/usr/bin/env python3
"""Party Chat moderator console: python moderator.py --help"""

import sys

from partychat.moderator.cli import main

if __name__ == "__main__":
    sys.exit(main())
