"""Several Mindset apps: per-app settings (``api.apps``) and per-app call policies
(``connector.apps``): keys, rate limits, in-flight caps and auth pauses of their own."""

from __future__ import annotations

import asyncio
import os
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import yaml

from connector.apps import AppPolicy, Apps
from connector.calls import Attempt
from connector.config import ENV_PREFIX, ConnectorSettings, load_settings
from connector.errors import ApiKeyInvalid, AuthError, ConfigError
from connector.metrics import Metrics
from connector.routing import ThreadRequest
from connector.threads_client import ApiThread

DEFAULT_KEY = "default-key-must-not-leak"
KEY_B = "key-b-must-not-leak"


def route(app: str, event_type: str) -> dict[str, Any]:
    return {
        "event_type": event_type,
        "app_uid": app,
        "agent_uid": "agent-orders",
        "message_template": "Order ${data.orderId}",
        "user": {"path": "user"},
    }


ROUTES = [route("app-a", "order.shipped"), route("app-b", "order.cancelled")]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "connector.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return str(info.value)


# -- settings -----------------------------------------------------------------------------


def test_single_app_configuration_stays_valid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}API__API_KEY", DEFAULT_KEY)
    data = {"api": {"rate_limit_per_s": 7, "max_in_flight": 9}, "routes": [ROUTES[0]]}
    settings = load_settings(write(tmp_path, data))
    assert settings.app_uids() == ["app-a"]
    assert settings.app_key("app-a")().get_secret_value() == DEFAULT_KEY
    api = settings.api.for_app("app-a")
    assert (api.rate_limit_per_s, api.max_in_flight) == (7, 9)


def test_each_app_has_its_key_from_file_or_environment_and_its_own_limits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_a = tmp_path / "key-a"
    key_a.write_text("key-a-from-file\n")
    # the appUid's dashes in the variable name (Kubernetes allows them; so does `env`)
    monkeypatch.setenv(f"{ENV_PREFIX}API__APPS__APP-B__API_KEY", KEY_B)
    data = {
        "api": {
            "rate_limit_per_s": 20,
            "apps": {
                "app-a": {"api_key_file": str(key_a), "rate_limit_per_s": 10, "max_in_flight": 3},
                "app-b": {"rate_limit_per_s": 5},
            },
        },
        "routes": ROUTES,
    }
    settings = load_settings(write(tmp_path, data))

    assert settings.app_key("app-a")().get_secret_value() == "key-a-from-file"
    assert settings.app_key("app-b")().get_secret_value() == KEY_B
    a, b = settings.api.for_app("app-a"), settings.api.for_app("app-b")
    assert (a.rate_limit_per_s, a.max_in_flight) == (10, 3)
    assert (b.rate_limit_per_s, b.max_in_flight) == (5, settings.api.max_in_flight)
    assert KEY_B not in repr(settings) and KEY_B not in settings.model_dump_json()


def test_an_app_named_only_by_its_environment_key_merges_with_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_a = tmp_path / "key-a"
    key_a.write_text("key-a")
    monkeypatch.setenv(f"{ENV_PREFIX}API__APPS__APP-B__API_KEY", KEY_B)
    data = {"api": {"apps": {"app-a": {"api_key_file": str(key_a)}}}, "routes": ROUTES}
    settings = load_settings(write(tmp_path, data))
    assert sorted(settings.api.apps) == ["app-a", "app-b"]
    assert settings.app_key("app-a")().get_secret_value() == "key-a"
    assert settings.app_key("app-b")().get_secret_value() == KEY_B


def test_a_route_whose_app_has_no_key_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}API__APPS__APP-A__API_KEY", "key-a")
    message = config_error(write(tmp_path, {"routes": ROUTES}))
    assert "routes.1 (app_uid 'app-b') has no API key" in message
    assert f"{ENV_PREFIX}API__APPS__APP-B__API_KEY" in message
    assert "routes.0" not in message
    # a default key covers the apps without one of their own
    monkeypatch.setenv(f"{ENV_PREFIX}API__API_KEY", DEFAULT_KEY)
    settings = load_settings(write(tmp_path, {"routes": ROUTES}))
    assert settings.app_key("app-b")().get_secret_value() == DEFAULT_KEY
    assert settings.app_key("app-a")().get_secret_value() == "key-a"


def test_an_app_key_written_in_the_file_is_refused(tmp_path: Path) -> None:
    data = {"api": {"apps": {"app-b": {"api_key": KEY_B}}}, "routes": ROUTES}
    message = config_error(write(tmp_path, data))
    assert message.startswith("api.apps.app-b.api_key:")
    assert KEY_B not in message


def test_app_names_differing_only_in_case_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The environment cannot name ``App-B`` (its names are lower-cased): say so."""
    monkeypatch.setenv(f"{ENV_PREFIX}API__API_KEY", DEFAULT_KEY)
    monkeypatch.setenv(f"{ENV_PREFIX}API__APPS__APP-B__API_KEY", KEY_B)
    data = {"api": {"apps": {"App-B": {"rate_limit_per_s": 1}}}, "routes": ROUTES}
    message = config_error(write(tmp_path, data))
    assert "differ only in case" in message and KEY_B not in message


def test_an_unusable_app_key_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(f"{ENV_PREFIX}API__API_KEY", DEFAULT_KEY)
    monkeypatch.setenv(f"{ENV_PREFIX}API__APPS__APP-B__API_KEY", "bad\x01key")
    settings = ConnectorSettings(routes=ROUTES)  # type: ignore[arg-type]
    with pytest.raises(ApiKeyInvalid, match="APP-B__API_KEY") as info:
        settings.app_key("app-b")()
    assert "bad" not in str(info.value)


# -- call policies ------------------------------------------------------------------------


def two_apps(monkeypatch: pytest.MonkeyPatch, **api: Any) -> ConnectorSettings:
    monkeypatch.setenv(f"{ENV_PREFIX}API__API_KEY", DEFAULT_KEY)
    defaults = {"ramp_up_s": 0, "auth_probe_interval_s": 30.0}
    return ConnectorSettings(api=defaults | api, routes=ROUTES)  # type: ignore[arg-type]


def request(app: str) -> ThreadRequest:
    return ThreadRequest(app, "agent-orders", "hello", "system", "humanUid", "h-1")


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(f"threads_connector_{name}", labels)


def test_rate_limits_are_the_apps_own_each_split_by_partition_share(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    settings = two_apps(
        monkeypatch,
        rate_limit_per_s=30,
        rate_limit_burst=30,
        apps={"app-a": {"rate_limit_per_s": 12, "rate_limit_burst": 6}},
    )
    metrics = Metrics()
    apps = Apps(settings, metrics, clock=lambda: now[0])

    shares = apps.apply_share(2, 6)  # this replica owns 2 of the 6 input partitions

    assert shares == pytest.approx({"app-a": 4.0, "app-b": 10.0})
    assert sample(metrics, "rate_limit_share_per_second", app="app-a") == pytest.approx(4.0)
    assert sample(metrics, "rate_limit_share_per_second", app="app-b") == pytest.approx(10.0)
    a, b = apps.policies["app-a"].bucket, apps.policies["app-b"].bucket
    now[0] += 10.0  # both buckets fill up to their bursts (the group's split by share)
    assert a.tokens() == pytest.approx(2.0) and b.tokens() == pytest.approx(10.0)
    while a.try_acquire() == 0:  # app-a spends all it may
        pass
    assert b.tokens() == pytest.approx(10.0)  # ...and app-b's budget is untouched
    apps.stop_calls()  # a revocation stops every app's calls
    assert a.rate == 0 and b.rate == 0


class FakeApi:
    """Answers per app: 403 for a key that is not the app's, 201 otherwise."""

    def __init__(self) -> None:
        self.refuse: set[str] = set()
        self.calls: list[str] = []

    def attempt_for(self, policy: AppPolicy, stack: AsyncExitStack) -> Attempt:
        async def attempt(
            request: ThreadRequest, *, event_id: str, correlation_id: str
        ) -> ApiThread:
            assert request.app_uid == policy.app_uid  # each app calls with its own policy
            self.calls.append(policy.app_uid)
            await asyncio.sleep(0)
            if policy.app_uid in self.refuse:
                raise AuthError("HTTP 403: forbidden", status=403)
            return ApiThread(f"th-{event_id}", "hu-1", request.agent_uid)

        return attempt


async def test_one_apps_403_pause_does_not_hold_the_other_apps_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = two_apps(monkeypatch, rate_limit_per_s=1000, rate_limit_burst=1000)
    metrics = Metrics()
    apps = Apps(settings, metrics)
    api = FakeApi()
    api.refuse.add("app-a")
    async with AsyncExitStack() as stack:
        apps.start(stack, api.attempt_for)
        apps.apply_share(1, 1)
        waiting_a = asyncio.create_task(apps.call(request("app-a"), "a-1", "c-a-1"))
        while apps.pause_reason() is None:
            await asyncio.sleep(0.01)

        created = [await apps.call(request("app-b"), f"b-{i}", f"c-b-{i}") for i in range(5)]

        assert [c.thread_uid for c in created] == [f"th-b-{i}" for i in range(5)]
        assert not waiting_a.done()  # app-a's event waits (no dead letter), probing
        reason = apps.pause_reason()
        assert reason is not None and reason.startswith("app app-a: paused:")
        assert "app-b" not in reason
        assert sample(metrics, "auth_paused", app="app-a") == 1
        assert sample(metrics, "auth_paused", app="app-b") == 0
        forbidden = {"status_class": "4xx", "code": "403"}
        assert sample(metrics, "api_responses_total", **forbidden, app="app-a") == 1
        assert sample(metrics, "api_responses_total", **forbidden, app="app-b") == 0
        assert sample(metrics, "api_responses_total", status_class="2xx", code="201", app="app-b")
        # the circuit breaker is the host's, one for every app: a 403 is an answer
        assert apps.breaker.is_open
        waiting_a.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting_a


async def test_in_flight_caps_are_the_apps_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """app-a's cap full (its calls hang) does not keep app-b's calls from going out."""
    settings = two_apps(
        monkeypatch,
        rate_limit_per_s=1000,
        rate_limit_burst=1000,
        apps={"app-a": {"max_in_flight": 2}},
    )
    metrics = Metrics()
    apps = Apps(settings, metrics)
    release = asyncio.Event()
    started: list[str] = []

    def attempt_for(policy: AppPolicy, stack: AsyncExitStack) -> Attempt:
        async def attempt(
            request: ThreadRequest, *, event_id: str, correlation_id: str
        ) -> ApiThread:
            started.append(event_id)
            if policy.app_uid == "app-a":
                await release.wait()
            return ApiThread(f"th-{event_id}", "hu-1", request.agent_uid)

        return attempt

    async with AsyncExitStack() as stack:
        apps.start(stack, attempt_for)
        apps.apply_share(1, 1)
        hung = [asyncio.create_task(apps.call(request("app-a"), f"a-{i}", "c")) for i in range(4)]
        while len(started) < 2:
            await asyncio.sleep(0.01)
        done = await apps.call(request("app-b"), "b-1", "c")
        assert done.thread_uid == "th-b-1"
        assert sorted(started) == ["a-0", "a-1", "b-1"]  # app-a: two in flight, two wait
        assert sample(metrics, "calls_in_flight", app="app-a") == 2
        assert sample(metrics, "calls_in_flight", app="app-b") == 0
        release.set()
        assert len(await asyncio.gather(*hung)) == 4
