"""What the local-Kafka modules share: versions, defaults, the error type, log tails."""

from __future__ import annotations

import logging
import os
from pathlib import Path

# one logger for the whole package, named as before the module became a package
logger = logging.getLogger("connector.localkafka")

KAFKA_VERSION = "4.1.1"
LOG4J_VERSION = "2.24.3"
HOST = "127.0.0.1"
CACHE_ENV = "THREADS_CONNECTOR_CACHE"
DEFAULT_STATE_DIR = Path(".local/kafka")


class LocalKafkaError(RuntimeError):
    """The local broker could not be fetched, started or stopped; the message says why."""


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _tail_file(path: Path, lines: int = 40) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            return _tail(fh.read().decode("utf-8", "replace"), lines)
    except OSError:
        return ""
