"""The record of what the simulator created and answered. Thread-safe.

Tests read it to count threads per event id (duplicates) and responses per status code.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class CreatedThread:
    """One thread the simulator created."""

    thread_uid: str
    app_uid: str
    agent_uid: str
    """As sent, possibly ``agentUid::sessionUid``."""
    human_uid: str
    """The humanUid answered: the one sent, or the one resolved from the identifier."""
    message_type: str
    message: str
    identifier_field: str
    """Which user identifier the request carried: humanUid, externalUserId, ..."""
    identifier_value: str
    event_id: str | None
    """The ``x-event-id`` request header, if any."""
    correlation_id: str | None
    """The ``x-correlation-id`` request header, if any."""
    created_at: datetime
    answered: bool = True
    """False when an injected timeout kept the client from hearing of this thread."""
    traceparent: str | None = None
    """The W3C ``traceparent`` request header, if any (tracing)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "threadUid": self.thread_uid,
            "appUid": self.app_uid,
            "agentUid": self.agent_uid,
            "humanUid": self.human_uid,
            "messageType": self.message_type,
            "message": self.message,
            "identifierField": self.identifier_field,
            "identifierValue": self.identifier_value,
            "eventId": self.event_id,
            "correlationId": self.correlation_id,
            "traceparent": self.traceparent,
            "createdAt": self.created_at.isoformat(),
            "answered": self.answered,
        }


class ThreadStore:
    """Created threads in creation order, and counts of responses by status code."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: list[CreatedThread] = []
        self._responses: Counter[int] = Counter()
        self._timeouts = 0

    def add(self, thread: CreatedThread) -> None:
        with self._lock:
            self._threads.append(thread)

    def record_response(self, status: int) -> None:
        with self._lock:
            self._responses[status] += 1

    def record_timeout(self) -> None:
        """An injected timeout started hanging (whether or not it created a thread)."""
        with self._lock:
            self._timeouts += 1

    def all(self) -> list[CreatedThread]:
        with self._lock:
            return list(self._threads)

    def by_event_id(self, event_id: str) -> list[CreatedThread]:
        with self._lock:
            return [t for t in self._threads if t.event_id == event_id]

    def count_by_event_id(self) -> dict[str, int]:
        """Threads per ``x-event-id``; threads sent without one are not counted."""
        with self._lock:
            counts = Counter(t.event_id for t in self._threads if t.event_id is not None)
        return dict(counts)

    def response_counts(self) -> dict[int, int]:
        with self._lock:
            return dict(self._responses)

    @property
    def timeouts(self) -> int:
        with self._lock:
            return self._timeouts

    def clear(self) -> None:
        with self._lock:
            self._threads.clear()
            self._responses.clear()
            self._timeouts = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._threads)

    def summary(self) -> dict[str, Any]:
        """What ``GET /_simulator/stats`` answers."""
        with self._lock:
            threads = list(self._threads)
            responses = dict(self._responses)
            timeouts = self._timeouts
        per_event = Counter(t.event_id for t in threads if t.event_id is not None)
        return {
            "threads": len(threads),
            "unansweredThreads": sum(1 for t in threads if not t.answered),
            "timeouts": timeouts,
            "responses": {str(code): n for code, n in sorted(responses.items())},
            "eventIds": {
                "distinct": len(per_event),
                "withoutEventId": sum(1 for t in threads if t.event_id is None),
                "duplicated": {eid: n for eid, n in sorted(per_event.items()) if n > 1},
            },
        }
