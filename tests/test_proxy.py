"""connector.proxy and the client through a real forward proxy (proxy.py on loopback).

The proxy's access log is the proof that a call went through it: each test reads it.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import trustme
from aiohttp import web
from pydantic import SecretStr, ValidationError

from connector.config import ApiSettings, format_validation_error
from connector.errors import ConfigError, RetriableApiError
from connector.localkafka.ports import free_ports
from connector.proxy import Proxy, read_auth_file, resolve
from connector.threads_client import ThreadsClient
from tests.test_threads_client import REQUEST, serving

PROXY_BIN = Path(sys.executable).with_name("proxy")


class RunningProxy:
    def __init__(self, url: str, log: Path) -> None:
        self.url = url
        self.log = log

    def access_lines(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if " - " in line]


@contextlib.contextmanager
def forward_proxy(tmp_path: Path, basic_auth: str | None = None) -> Iterator[RunningProxy]:
    """proxy.py listening on a free loopback port, one worker; stopped and waited for."""
    (port,) = free_ports(1)
    log = tmp_path / "proxy.log"
    args = [str(PROXY_BIN), "--hostname", "127.0.0.1", "--port", str(port)]
    args += ["--num-workers", "1", "--num-acceptors", "1", "--log-file", str(log)]
    if basic_auth is not None:
        args += ["--basic-auth", basic_auth]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            assert process.poll() is None, f"proxy.py exited: {log.read_text()}"
            assert time.monotonic() < deadline, "proxy.py did not listen within 20 s"
            time.sleep(0.05)
        yield RunningProxy(f"http://127.0.0.1:{port}", log)
    finally:
        process.terminate()
        process.wait(10)


async def created(request: web.BaseRequest) -> web.StreamResponse:
    await request.read()
    return web.Response(status=201, body=orjson.dumps({"threadUid": "th-1"}))


def client(base_url: str, proxy: Proxy | None, ca_file: Path | None = None) -> ThreadsClient:
    return ThreadsClient(
        base_url,
        lambda: SecretStr("the-api-key"),
        connect_timeout_s=2.0,
        request_timeout_s=5.0,
        max_in_flight=2,
        ca_file=ca_file,
        proxy=proxy,
    )


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, Path]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    ca_file = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return server, ca_file


# -- through the real proxy ----------------------------------------------------------------


async def test_an_http_api_is_called_through_the_proxy(tmp_path: Path) -> None:
    with forward_proxy(tmp_path) as proxy:
        async with serving(created) as base_url:
            proxy_settings = resolve(ApiSettings(base_url=base_url, proxy_url=proxy.url))
            assert proxy_settings is not None
            async with client(base_url, proxy_settings) as c:
                thread = await c.create_thread(REQUEST, event_id="e", correlation_id="c")
    lines = proxy.access_lines()  # complete once the proxy has stopped
    assert thread.thread_uid == "th-1"
    hostport = base_url.removeprefix("http://")
    assert any(f"POST {hostport}/api/v1/appuid/" in line for line in lines), lines


async def test_an_https_api_is_tunnelled_with_connect_from_https_proxy(
    tmp_path: Path, tls: tuple[ssl.SSLContext, Path]
) -> None:
    """HTTPS_PROXY from the environment; TLS end to end (the API's certificate checked)."""
    server_ctx, ca_file = tls
    with forward_proxy(tmp_path) as proxy:
        async with serving(created, server_ctx) as base_url:
            assert base_url.startswith("https://")
            found = resolve(ApiSettings(base_url=base_url), {"HTTPS_PROXY": proxy.url})
            assert found == Proxy(proxy.url, "HTTPS_PROXY")
            async with client(base_url, found, ca_file) as c:
                thread = await c.create_thread(REQUEST, event_id="e", correlation_id="c")
    lines = proxy.access_lines()  # complete once the proxy has stopped
    assert thread.thread_uid == "th-1"
    hostport = base_url.removeprefix("https://")
    assert any(f"CONNECT {hostport}" in line for line in lines), lines


async def test_proxy_credentials_from_the_auth_file(
    tmp_path: Path, tls: tuple[ssl.SSLContext, Path]
) -> None:
    server_ctx, ca_file = tls
    auth = tmp_path / "proxy-auth"
    auth.write_text("egress:s3cret\n")
    with forward_proxy(tmp_path, basic_auth="egress:s3cret") as proxy:
        async with serving(created) as http_url, serving(created, server_ctx) as https_url:
            for base_url in (http_url, https_url):
                api = ApiSettings(base_url=base_url, proxy_url=proxy.url, proxy_auth_file=auth)
                found = resolve(api)
                assert found is not None and found.username == "egress"
                assert "s3cret" not in found.describe() and "s3cret" not in repr(found)
                async with client(base_url, found, ca_file) as c:
                    thread = await c.create_thread(REQUEST, event_id="e", correlation_id="c")
                assert thread.thread_uid == "th-1"


async def test_a_proxy_refusing_us_is_a_retriable_proxy_failure_not_a_dead_letter(
    tmp_path: Path, tls: tuple[ssl.SSLContext, Path]
) -> None:
    """407 (no or wrong credentials), for a tunnel and for a plain request: the proxy's
    failure trips the circuit breaker like the host's; no event is dead-lettered."""
    server_ctx, ca_file = tls
    with forward_proxy(tmp_path, basic_auth="egress:s3cret") as proxy:
        async with serving(created) as http_url, serving(created, server_ctx) as https_url:
            for base_url in (http_url, https_url):
                wrong = Proxy(proxy.url, "api.proxy_url", "egress", SecretStr("nope"))
                for found in (Proxy(proxy.url, "api.proxy_url"), wrong):
                    async with client(base_url, found, ca_file) as c:
                        with pytest.raises(RetriableApiError) as info:
                            await c.create_thread(REQUEST, event_id="e", correlation_id="c")
                    assert info.value.kind == "proxy_error", (base_url, info.value)
                    assert info.value.transport_failure
                    assert "407" in str(info.value) and "nope" not in str(info.value)


async def test_an_unreachable_proxy_is_a_proxy_failure() -> None:
    (port,) = free_ports(1)
    nobody = Proxy(f"http://127.0.0.1:{port}", "api.proxy_url")
    async with serving(created) as base_url, client(base_url, nobody) as c:
        with pytest.raises(RetriableApiError) as info:
            await c.create_thread(REQUEST, event_id="e", correlation_id="c")
    assert info.value.kind == "proxy_error" and info.value.transport_failure


# -- where the proxy comes from ------------------------------------------------------------

HTTPS = "https://api.example.com"


def test_the_environment_by_scheme_and_lower_case_first() -> None:
    env = {"HTTPS_PROXY": "http://upper:3128", "https_proxy": "http://lower:3128"}
    assert resolve(ApiSettings(base_url=HTTPS), env) == Proxy("http://lower:3128", "https_proxy")
    only_http = {"HTTP_PROXY": "http://p:3128"}
    assert resolve(ApiSettings(base_url=HTTPS), only_http) is None
    assert resolve(ApiSettings(base_url="http://api.example.com"), only_http) == Proxy(
        "http://p:3128", "HTTP_PROXY"
    )
    assert resolve(ApiSettings(base_url=HTTPS), {"HTTPS_PROXY": "p:8080"}) == Proxy(
        "http://p:8080", "HTTPS_PROXY"
    )


@pytest.mark.parametrize(
    ("no_proxy", "bypassed"),
    [
        ("api.example.com", True),
        (".example.com", True),
        ("example.com", True),
        ("*", True),
        ("api.example.com:443", True),
        ("api.example.com:8443", False),
        ("other.example.com,localhost", False),
        ("xample.com", False),
        ("", False),
    ],
)
def test_no_proxy(no_proxy: str, bypassed: bool) -> None:
    env = {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": no_proxy}
    assert (resolve(ApiSettings(base_url=HTTPS), env) is None) is bypassed


@pytest.mark.parametrize(
    ("base_url", "no_proxy", "bypassed"),
    [
        # the cluster-wide proxy's NO_PROXY of Kubernetes/OpenShift: CIDRs of the networks
        ("https://10.40.3.7:8443", ".cluster.local,.svc,10.0.0.0/8,localhost", True),
        ("https://10.40.3.7", "10.40.3.0/24", True),
        ("https://10.41.3.7", "10.40.3.0/24", False),
        ("https://[fd00::17]", "fd00::/8", True),
        ("https://[fd00::17]:8443", "[fd00::17]:8443", True),
        ("https://api.example.com", "10.0.0.0/8", False),
        # Java's and Go's wildcard spelling of a domain and its subdomains
        ("https://api.example.com", "*.example.com", True),
        ("https://api.example.com", "*.other.com", False),
    ],
)
def test_no_proxy_cidrs_and_wildcards(base_url: str, no_proxy: str, bypassed: bool) -> None:
    """CIDR entries (curl 7.86+, Go, the NO_PROXY of a cluster-wide proxy) and ``*.``
    wildcards were compared as host names: an API on the cluster network was sent to the
    egress proxy, which cannot reach it (every call a proxy failure)."""
    env = {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": no_proxy}
    assert (resolve(ApiSettings(base_url=base_url), env) is None) is bypassed


def test_proxy_url_wins_and_ignores_no_proxy() -> None:
    api = ApiSettings(base_url=HTTPS, proxy_url="http://mine:3128")
    env = {"HTTPS_PROXY": "http://env:3128", "NO_PROXY": "*"}
    assert resolve(api, env) == Proxy("http://mine:3128", "api.proxy_url")


def test_proxy_from_env_false_ignores_the_environment() -> None:
    api = ApiSettings(base_url=HTTPS, proxy_from_env=False)
    assert resolve(api, {"HTTPS_PROXY": "http://env:3128"}) is None


def test_credentials_in_the_environment_url_are_split_off() -> None:
    found = resolve(ApiSettings(base_url=HTTPS), {"HTTPS_PROXY": "http://u%40corp:p%3Aw@p:3128"})
    assert found is not None
    assert (found.url, found.username) == ("http://p:3128", "u@corp")
    assert found.password is not None and found.password.get_secret_value() == "p:w"
    assert "p:w" not in found.describe()


def test_an_https_proxy_url_in_the_environment_stops_start_up_without_its_credentials() -> None:
    with pytest.raises(ConfigError, match="HTTPS_PROXY") as info:
        resolve(ApiSettings(base_url=HTTPS), {"HTTPS_PROXY": "https://u:secret@p:3128"})
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("http://u:secret@p:3128", "api.proxy_auth_file"),
        ("https://p:3128", "http://host:port"),
        ("http://p:3128/path", "http://host:port"),
        ("p:3128", "http://host:port"),
    ],
)
def test_a_bad_proxy_url_is_refused(value: str, message: str) -> None:
    with pytest.raises(ValidationError, match="proxy_url") as info:
        ApiSettings(proxy_url=value)
    text = format_validation_error(info.value)  # what start-up prints
    assert "proxy_url" in text and message in text and "secret" not in text


@pytest.mark.parametrize("content", ["no-colon", ":password-only", "a:b\nc:d", "\u00e9:x"])
def test_a_bad_auth_file_names_the_file_not_the_content(tmp_path: Path, content: str) -> None:
    path = tmp_path / "auth"
    path.write_text(content)
    with pytest.raises(ConfigError, match=r"api\.proxy_auth_file") as info:
        read_auth_file(path)
    assert "password-only" not in str(info.value) and "no-colon" not in str(info.value)


def test_an_unreadable_auth_file_stops_start_up(tmp_path: Path) -> None:
    api = ApiSettings(proxy_url="http://p:3128", proxy_auth_file=tmp_path / "missing")
    with pytest.raises(ConfigError, match="cannot read"):
        resolve(api)


# -- the connector through the proxy ------------------------------------------------------


@pytest.mark.integration
async def test_the_connector_calls_the_api_through_the_proxy_from_https_proxy(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY in the connector's environment, NO_PROXY cleared (it named 127.0.0.1 on
    many machines, and the proxy was silently bypassed): every call goes through it."""
    from connector.simulator import SimulatorSettings, ThreadsApiSimulator
    from tests.harness import (
        Names,
        event,
        make_settings,
        produce,
        results,
        running,
        wait_until_committed,
    )

    for name in ("NO_PROXY", "no_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    names = Names.fresh("proxy")
    with forward_proxy(tmp_path) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        async with ThreadsApiSimulator(SimulatorSettings(seed=5)) as sim:
            settings = make_settings(kafka_bootstrap, sim.base_url, names)
            sim_hostport = sim.base_url.removeprefix("http://").rstrip("/")
            async with running(settings):
                await produce(kafka_bootstrap, names.input,
                              [(b"u-1", event(f"p-{i}")) for i in range(5)])  # fmt: skip
                await wait_until_committed(kafka_bootstrap, names.group, names.input)
    out = await results(kafka_bootstrap, names.results)
    assert sorted(r["eventId"] for r in out) == [f"p-{i}" for i in range(5)]
    # proxy.py logs a connection once (its first request); the connector's pool reuses them
    posts = [line for line in proxy.access_lines() if "POST " in line and "/threads" in line]
    assert posts, proxy.access_lines()
    # every call through the proxy; the one 400 is the start-up probe (an empty body: the
    # API proves the key without making a thread), the rest the events' 201s
    assert all(f"POST {sim_hostport}/api/v1/appuid/demo-app/threads - " in p for p in posts)
    assert sum(" - 400 " in p for p in posts) <= 1, posts
    assert any(" - 201 " in p for p in posts), posts


async def test_check_config_online_probes_the_api_through_the_proxy(tmp_path: Path) -> None:
    """``check-config --online``'s API probe goes the way the calls go: through the
    proxy, a 407 named as the proxy's, then accepted with the credentials file."""
    from connector.preflight import Status
    from connector.preflight_api import api_checks
    from connector.simulator import SimulatorSettings, ThreadsApiSimulator
    from tests.harness import Names, make_settings

    auth = tmp_path / "proxy-auth"
    auth.write_text("egress:s3cret\n")
    with forward_proxy(tmp_path, basic_auth="egress:s3cret") as proxy:
        async with ThreadsApiSimulator(SimulatorSettings(seed=9)) as sim:
            names = Names.fresh("probe")
            api: dict[str, str] = {"proxy_url": proxy.url}
            without = make_settings("127.0.0.1:1", sim.base_url, names, api=api)
            (refused,) = await api_checks(without)
            api["proxy_auth_file"] = str(auth)
            withauth = make_settings("127.0.0.1:1", sim.base_url, names, api=api)
            (accepted,) = await api_checks(withauth)
    assert refused.status is Status.FAIL and "egress proxy" in refused.detail, refused
    assert "api.proxy_auth_file" in refused.detail
    assert accepted.status is Status.OK, accepted
    assert "s3cret" not in refused.detail + accepted.detail
