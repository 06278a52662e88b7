#!/usr/bin/env python3
"""Party Chat model persona: python client.py --help"""

import sys

from partychat.persona.cli import main

if __name__ == "__main__":
    sys.exit(main())
