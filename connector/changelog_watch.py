"""A running replica re-checks its dedup changelogs every ``dedup.changelog_check_interval_s``.

Start-up refuses a changelog that breaks the dedup guarantee (``connector.topics``), but an
operator can change a topic's configuration, or delete it, while the connector runs: a
retention shortened under ``dedup.ttl_s`` empties it silently, and the next restart would
restore nothing. The watch says so where an operator looks (``problem``, read by
``/readyz``; one log line per change) and, when ``kafka.create_topics`` allows, corrects a
breached setting (``TopicManager.check_changelogs``). A deleted changelog is never
re-created here: its state is gone, and the operator decides (the message says how).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from connector.config import ConnectorSettings
from connector.topics import TopicManager

log = logging.getLogger(__name__)


class ChangelogWatch:
    """The changelogs' state as last checked; ``problem`` is None when they are sound."""

    def __init__(self, settings: ConnectorSettings, inputs: Callable[[], dict[str, int]]) -> None:
        self._settings = settings
        self._inputs = inputs
        self.problem: str | None = None  # read by /readyz from the health thread

    async def run(self, stop: asyncio.Event) -> None:
        interval = self._settings.dedup.changelog_check_interval_s
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if stop.is_set():
                return
            await self.check()

    async def check(self) -> None:
        s = self._settings
        try:
            async with TopicManager(s) as topics:
                problems = await topics.check_changelogs(self._inputs(), fix=s.kafka.create_topics)
        except Exception:  # Kafka unreachable: the reachability probe says so
            log.debug("changelog check failed", exc_info=True)
            return
        problem = "; ".join(problems) or None
        if problem != self.problem:
            if problem is not None:
                log.error("dedup changelog problem: %s", problem)
            else:
                log.info("dedup changelogs are sound again")
        self.problem = problem
