"""``check-config --online``, the API part: for each app, ``POST
/api/v1/appuid/{appUid}/threads`` with a body that cannot create a thread
(``ThreadsClient.probe``). The OpenAPI checks the key (401, 403) before the body (400), so
400 (or 422) proves the path and the key; 404 or 405 a wrong ``api.base_url``.

``probe_app`` is also ``run``'s start-up probe (``connector.startup_checks``): its own
client, so a probe is never one of the calls the metrics and the circuit breaker count."""

from __future__ import annotations

from dataclasses import dataclass

from connector.config import ConnectorSettings, mask_url
from connector.errors import ApiError, ConfigError
from connector.preflight import Check, Status
from connector.proxy import resolve
from connector.threads_client import ThreadsClient

PROBE_TIMEOUT_S = 15.0
ACCEPTED = frozenset({400, 422})  # the invalid body refused: path and key are right
WRONG_KEY = frozenset({401, 403})
WRONG_PATH = frozenset({404, 405})


@dataclass(frozen=True)
class Probe:
    """One app's probe: the status answered (None: no answer, or no key to send) and the
    check it makes."""

    app: str
    status: int | None
    check: Check

    @property
    def refused(self) -> bool:
        """A definite configuration fault (wrong key or path), not a transient failure."""
        return self.status in WRONG_KEY or self.status in WRONG_PATH


async def api_checks(settings: ConnectorSettings) -> list[Check]:
    try:
        resolve(settings.api)
    except ConfigError as exc:  # one line for every app
        return [Check("api", Status.SKIPPED, f"the egress proxy: {exc}")]
    return [(await probe_app(settings, app)).check for app in settings.app_uids()]


async def probe_app(settings: ConnectorSettings, app: str) -> Probe:
    """The app's probe; never raises for what it finds."""
    try:
        proxy = resolve(settings.api)
    except ConfigError as exc:
        return Probe(app, None, Check("api", Status.SKIPPED, f"the egress proxy: {exc}"))
    api = settings.api.for_app(app)
    try:
        key = settings.app_key(app)
    except ConfigError as exc:
        return Probe(app, None, Check("api", Status.SKIPPED, f"app {app}: {exc}"))
    client = ThreadsClient(
        api.base_url,
        key,
        connect_timeout_s=api.connect_timeout_s,
        request_timeout_s=min(api.request_timeout_s, PROBE_TIMEOUT_S),
        max_in_flight=1,
        ca_file=api.ca_file,
        proxy=proxy,
    )
    async with client:
        try:
            status, url = await client.probe(app)
        except ApiError as exc:
            where = mask_url(api.base_url)
            return Probe(
                app, None, Check("api", Status.FAIL, f"app {app}: {where} unreachable: {exc}")
            )
    return Probe(app, status, _api_verdict(app, status, mask_url(url)))


def _api_verdict(app: str, status: int, url: str) -> Check:
    where = f"app {app}: POST {url} answered {status}"
    if status in ACCEPTED:
        return Check("api", Status.OK, f"{where} to an invalid body: path and key accepted")
    if status == 401:
        return Check("api", Status.FAIL, f"{where}: the API key is not accepted")
    if status == 403:
        return Check(
            "api", Status.FAIL, f"{where}: the API key does not belong to this app (api.apps.{app})"
        )
    if status == 407:
        return Check(
            "api",
            Status.FAIL,
            f"{where}: from the egress proxy, which wants credentials (api.proxy_auth_file)",
        )
    if status in WRONG_PATH:
        return Check(
            "api",
            Status.FAIL,
            f"{where}: wrong path; api.base_url is the API's origin (with a gateway's "
            "prefix, if any), without /api/v1",
        )
    if 300 <= status < 400:
        return Check(
            "api",
            Status.FAIL,
            f"{where}: a redirect (not followed): check api.base_url's scheme and host",
        )
    return Check("api", Status.FAIL, f"{where}: not the answer the API gives to an invalid body")
