"""``python -m connector.localkafka``: start, stop, inspect or pre-fetch the local broker."""

import sys

from connector.localkafka.cli import main

if __name__ == "__main__":
    sys.exit(main())
