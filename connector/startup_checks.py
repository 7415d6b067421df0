"""``run``'s start-up checks: the checks of ``check-config --online``, reported by /readyz.

- **The API, per app, at once** (``preflight_api.probe_app``: a body that cannot create a
  thread, sent by a client of its own, so no call metric and no circuit breaker counts
  it). A definite refusal pauses the app's calls before any event arrives: 401/403 (a
  wrong key) close its auth gate, 404/405 (a wrong ``api.base_url``) its start-up gate
  (``ThreadCaller.probe_refused``); readiness names the app, the status and the URL
  called, one line is logged, and the probe is repeated every
  ``api.startup_probe_interval_s`` until it is answered 400/422, which opens the gates.
  No answer, a 5xx or anything else pauses nothing and is not repeated: an outage is the
  circuit breaker's, a run of another status the route pause's (``connector.systemic``).
- **Kafka's permissions, once the topics are ready** (``preflight_online.kafka_checks``:
  group, input reads, transactional ids). A failed check turns readiness red naming the
  missing ACL, logged once, and is re-checked every ``kafka.permission_recheck_s`` until
  every check passes. A check that could not reach the brokers decides nothing (the
  reachability probe in ``connector.app`` names that) and is tried again.

``reason`` is read by the health server's thread: it reads plain attributes only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from connector.apps import Apps
from connector.config import ConnectorSettings
from connector.preflight import Status
from connector.preflight_api import Probe, probe_app
from connector.preflight_online import CHECK_SUFFIX, kafka_checks

log = logging.getLogger(__name__)
KAFKA_CHECK_TIMEOUT_S = 15.0
PERMISSIONS = ("group", "acl")  # the checks' names (``preflight.Check.name``) reported


class StartupChecks:
    """The start-up checks of one connector and what they found."""

    def __init__(self, settings: ConnectorSettings, apps: Apps) -> None:
        self._settings = settings
        self._apps = apps
        self.api_refused: dict[str, str] = {}  # app -> what its probe was answered
        self.kafka_failed: list[str] = []  # the failed Kafka checks' lines
        self.api_done = asyncio.Event()  # every app's probe passed or was inconclusive
        self.kafka_done = asyncio.Event()  # every Kafka check passed

    def reason(self) -> tuple[str, str] | None:
        """``(category, reason)`` while a Kafka check fails, else None. The apps' pauses
        are the apps' to report (``Apps.pause_reason``)."""
        failed = self.kafka_failed
        if failed:
            return "kafka_acl", "kafka: " + "; ".join(failed)
        return None

    # -- the API ---------------------------------------------------------------------

    async def probe_api(self, stop: asyncio.Event) -> None:
        """Probe every app; repeat for those refused until each passes."""
        pending = list(self._settings.app_uids())
        interval = self._settings.api.startup_probe_interval_s
        while pending:
            probes = await asyncio.gather(*(probe_app(self._settings, app) for app in pending))
            pending = [probe.app for probe in probes if not self._settle(probe)]
            if pending and not await _wait(stop, interval):
                return
        self.api_done.set()

    def _settle(self, probe: Probe) -> bool:
        """Act on one app's probe; True when it is settled (nothing to probe again)."""
        caller = self._apps.caller(probe.app)
        detail = probe.check.detail
        if probe.refused and probe.status is not None:
            if probe.app not in self.api_refused:
                caller.probe_refused(probe.status, detail)  # logs once
            self.api_refused[probe.app] = detail
            return False
        if probe.app in self.api_refused:
            del self.api_refused[probe.app]
        if probe.check.status is Status.OK:
            caller.probe_accepted()
        elif probe.check.status is Status.FAIL:
            log.warning(
                "start-up probe: %s (nothing paused: an outage is the circuit breaker's)",
                detail,
                extra={"app": probe.app, "status": probe.status},
            )
        return True

    # -- Kafka -----------------------------------------------------------------------

    async def check_kafka(self, stop: asyncio.Event) -> None:
        """Run the permission checks until every one passes."""
        interval = self._settings.kafka.permission_recheck_s
        # a transactional id of this replica's own (delivery.instance_id, the host name by
        # default): replicas starting together would fence each other's check with one id
        suffix = f"{CHECK_SUFFIX}-{self._settings.delivery.instance_id}"
        while True:
            checks = await kafka_checks(self._settings, KAFKA_CHECK_TIMEOUT_S, check_suffix=suffix)
            # the topics are run's own (created or refused at start): permissions only here
            failed = [c.detail for c in checks if c.status is Status.FAIL and c.name in PERMISSIONS]
            unreachable = any(c.status is Status.FAIL and c.name == "kafka" for c in checks)
            if failed != self.kafka_failed:
                if failed:
                    log.error("kafka start-up checks failed: %s", "; ".join(failed))
                elif self.kafka_failed:
                    log.warning("kafka start-up checks pass now")
            if failed or not unreachable:
                self.kafka_failed = failed
            if not failed and not unreachable:
                self.kafka_done.set()
                return
            if not await _wait(stop, interval):
                return


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds``; False when ``stop`` was set first."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return not stop.is_set()
