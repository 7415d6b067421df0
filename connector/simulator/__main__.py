"""``python -m connector.simulator``: serve the Threads API simulator."""

import sys

from connector.simulator.cli import main

if __name__ == "__main__":
    sys.exit(main())
