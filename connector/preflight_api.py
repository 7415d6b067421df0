"""``check-config --online``, the API part: for each app, ``POST
/api/v1/appuid/{appUid}/threads`` with a body that cannot create a thread
(``ThreadsClient.probe``). The OpenAPI checks the key (401, 403) before the body (400), so
400 (or 422) proves the path and the key; 404 or 405 a wrong ``api.base_url``."""

from __future__ import annotations

from connector.config import ConnectorSettings, mask_url
from connector.errors import ApiError, ConfigError
from connector.preflight import Check, Status
from connector.proxy import resolve
from connector.threads_client import ThreadsClient

PROBE_TIMEOUT_S = 15.0


async def api_checks(settings: ConnectorSettings) -> list[Check]:
    checks = []
    try:
        proxy = resolve(settings.api)
    except ConfigError as exc:
        return [Check("api", Status.SKIPPED, f"the egress proxy: {exc}")]
    for app in settings.app_uids():
        api = settings.api.for_app(app)
        try:
            key = settings.app_key(app)
        except ConfigError as exc:
            checks.append(Check("api", Status.SKIPPED, f"app {app}: {exc}"))
            continue
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
                checks.append(
                    Check(
                        "api",
                        Status.FAIL,
                        f"app {app}: {mask_url(api.base_url)} unreachable: {exc}",
                    )
                )
                continue
        checks.append(_api_verdict(app, status, mask_url(url)))
    return checks


def _api_verdict(app: str, status: int, url: str) -> Check:
    where = f"app {app}: POST {url} answered {status}"
    if status in (400, 422):
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
    if status in (404, 405):
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
