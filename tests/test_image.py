"""The container image itself: built with buildah and run, no Docker engine needed.

``scripts/build-image.sh`` builds the Dockerfile once per test session (on a base image made
from Debian packages, cached between sessions). The tests then run commands INSIDE the image
with ``buildah run --isolation chroot --network host``, as the image's own user: its
configuration (user, entrypoint, port), ``connector check-config`` on the ConfigMap the Helm
chart renders (mounted over /etc/threads-connector as Kubernetes does), and the connector
itself against the session's Kafka broker and the project's Threads API simulator on the
host network: events in, threads created, results out, drained on SIGTERM, no write to the
root filesystem.

buildah does not forward signals to the command it runs, so SIGTERM goes to the connector's
process, found under the ``buildah run`` process by its id.

Skipped only where buildah is missing (scripts/install-buildah.sh; `make tools` and CI run
it). Needs root (buildah's chroot isolation) and, for the ConfigMap, helm.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from packaging.utils import canonicalize_name

from connector.localkafka.ports import free_ports
from connector.simulator import SimulatorSettings, ThreadsApiSimulator
from tests.harness import API_KEY, ROUTES, Names, event, produce, results, wait_until_committed
from tests.kafka_helpers import create_topics
from tests.test_helm import CASE_IDS, CASES, config_map, pod_mounts, render_case
from tests.test_lock import RUNTIME_LOCK, parse_lock

ROOT = Path(__file__).resolve().parent.parent
BUILDAH = shutil.which("buildah")
# The storage driver scripts/build-image.sh builds with (vfs: any kernel, any file system).
STORAGE_DRIVER = "vfs"
IMAGE = os.environ.get("THREADS_CONNECTOR_TEST_IMAGE", "localhost/threads-connector:test")
USER = "10001:10001"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CONFIG_DIR = "/etc/threads-connector"
# Where a read-only root filesystem still lets the process write: the chart mounts an
# emptyDir on /tmp; the rest are kernel file systems and the files buildah run provides.
WRITABLE = ("/tmp", "/proc", "/sys", "/dev", "/run", "/etc/hosts", "/etc/resolv.conf")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        BUILDAH is None,
        reason="buildah is not installed: run scripts/install-buildah.sh (make tools does)",
    ),
]


def buildah(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(BUILDAH), "--storage-driver", STORAGE_DRIVER, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"buildah {' '.join(args)}\n{proc.stdout}\n{proc.stderr}"
    return proc


def run_args(container: str, *, volumes: dict[Path, str] | None = None, **env: str) -> list[str]:
    """``buildah run`` in the container on the host network, ``volumes`` {host: container}."""
    args = [str(BUILDAH), "--storage-driver", STORAGE_DRIVER, "run"]
    args += ["--isolation", "chroot", "--network", "host"]
    for source, target in (volumes or {}).items():
        args += ["-v", f"{source}:{target}"]
    for name, value in env.items():
        args += ["--env", f"{name}={value}"]
    return [*args, container, "--"]


def in_image(
    container: str, *command: str, volumes: dict[Path, str] | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*run_args(container, volumes=volumes, **env), *command],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="session")
def image(request: pytest.FixtureRequest) -> str:
    """The image, built once per session by scripts/build-image.sh; its build times shown."""
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-image.sh")],
        env={**os.environ, "IMAGE": IMAGE, "STORAGE_DRIVER": STORAGE_DRIVER},
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    assert proc.returncode == 0, f"build-image.sh failed\n{proc.stdout[-5000:]}\n{proc.stderr}"
    steps = [line for line in proc.stderr.splitlines() if line.startswith("build-image: ")]
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:  # in CI's log: the image's share of CI time
        with capture.global_and_fixture_disabled():
            reporter.write_line(
                f"\nimage {IMAGE} built in {time.monotonic() - started:.0f} s ({'; '.join(steps)})"
            )
    return IMAGE


@pytest.fixture(scope="session")
def container(image: str) -> Iterator[str]:
    """One working container for the session (with the vfs driver each one is a full copy
    of the image); every test runs its commands in it, none changes its root filesystem."""
    name = f"threads-connector-test-{uuid.uuid4().hex[:8]}"
    buildah("from", "--name", name, image)
    try:
        yield name
    finally:
        buildah("rm", name)


def image_config(image: str) -> dict[str, Any]:
    out = json.loads(buildah("inspect", "--type", "image", image).stdout)
    config: dict[str, Any] = out["OCIv1"]["config"]
    return config


def test_image_configuration(image: str) -> None:
    config = image_config(image)
    assert config["User"] == USER
    assert config["Entrypoint"] == ["connector"]
    assert config["Cmd"] == ["run", "--config", f"{CONFIG_DIR}/connector.yaml"]
    assert set(config["ExposedPorts"]) == {"9464/tcp"}
    assert config["StopSignal"] == "SIGTERM"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert config["Labels"]["org.opencontainers.image.version"] == version


def test_runs_as_the_non_root_user_with_the_locked_dependencies(container: str) -> None:
    # --all: on Python 3.11 a plain `pip freeze` leaves out setuptools, which the lock pins
    # (grpcio-tools requires it; `pip check` in the build fails without it)
    proc = in_image(container, "sh", "-c", "id -u; id -g; connector --version; pip freeze --all")
    assert proc.returncode == 0, proc.stderr
    uid, gid, version, *frozen = proc.stdout.splitlines()
    assert f"{uid}:{gid}" == USER
    assert version.startswith("connector ")
    installed = dict(line.split("==", 1) for line in frozen if "==" in line)
    installed.pop("pip")  # the installer `python -m venv` puts in every virtualenv, not locked
    (project,) = [line for line in frozen if "==" not in line]  # installed from the wheel
    assert re.fullmatch(r"threads-connector @ file:///wheels/threads_connector-.*\.whl", project)
    # exactly the lock's packages for linux (plus the project), at the lock's versions
    locked = {p.name: p.version for p in parse_lock(RUNTIME_LOCK) if p.applies_to_image()}
    assert {canonicalize_name(k): v for k, v in installed.items()} == locked


def test_the_host_ca_bundle_is_not_in_the_image(container: str) -> None:
    """The build mounts the host's CA bundle (a TLS proxy's CA may be in it) for the build
    only; the image keeps its own Debian bundle."""
    proc = in_image(container, "cat", str(CA_BUNDLE))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), "the image has no CA bundle (TLS to Kafka and the API needs one)"
    if CA_BUNDLE.exists():
        assert proc.stdout != CA_BUNDLE.read_text(), "the host's CA bundle was copied in"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_check_config_on_the_chart_configmap(
    container: str, tmp_path: Path, case: Path | None
) -> None:
    """The chart's ConfigMap (defaults and every ci/ values file), mounted over the image's
    config folder as the Deployment does."""
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "connector.yaml").write_text(
        config_map(render_case(case))["data"]["connector.yaml"]
    )
    config_dir.chmod(0o755)
    # the secrets and certificates the pod mounts: check-config reads and loads each
    pod_mounts((config_dir / "connector.yaml").read_text(), tmp_path / "mounts")
    secrets = tmp_path / "mounts" / "var" / "run" / "secrets"
    secrets.mkdir(parents=True, exist_ok=True)
    proc = in_image(
        container,
        "connector", "check-config", "--config", f"{CONFIG_DIR}/connector.yaml",
        # at /run/secrets: /var/run is a symlink to /run in the image, and buildah's chroot
        # isolation does not resolve a mount's target inside the image (a mount on
        # /var/run/secrets is not seen there); the connector reads /var/run/secrets/... as
        # the config says, through the symlink, as in a pod
        volumes={config_dir: f"{CONFIG_DIR}:ro", secrets: "/run/secrets:ro"},
        THREADS_CONNECTOR_API__API_KEY="test-api-key",
        THREADS_CONNECTOR_DELIVERY__INSTANCE_ID="rel-threads-connector-5d9f7c-abcde",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{CONFIG_DIR}/connector.yaml: OK" in proc.stdout


def test_check_config_on_the_image_default_config(container: str) -> None:
    proc = in_image(
        container,
        "connector", "check-config", "--config", f"{CONFIG_DIR}/connector.yaml",
        THREADS_CONNECTOR_API__API_KEY="test-api-key",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "routes: 4" in proc.stdout  # the repository's example config, baked in


async def test_connector_in_the_image_end_to_end(
    container: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Events in, threads created at the simulator, results out, clean drain on SIGTERM,
    as uid 10001, without writing to the root filesystem, the API key in no log line."""
    names = Names.fresh("image")
    (port,) = free_ports(1)
    writable = tmp_path / "tmp"  # the chart's emptyDir on /tmp
    writable.mkdir(mode=0o1777)
    writable.chmod(0o1777)
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    # the domain events topic exists before the connector starts, as in production (the
    # connector creates input topics only with kafka.create_input_topics: true; default off)
    await create_topics(kafka_bootstrap, {names.input: 2})
    before = await asyncio.to_thread(root_filesystem, container)
    async with ThreadsApiSimulator(SimulatorSettings(seed=1)) as sim:
        (config_dir / "connector.yaml").write_text(
            yaml.safe_dump(connector_config(kafka_bootstrap, sim.base_url, names, port))
        )
        args = run_args(
            container,
            volumes={config_dir: f"{CONFIG_DIR}:ro", writable: "/tmp"},
            THREADS_CONNECTOR_API__API_KEY=API_KEY,
        )
        proc = await asyncio.create_subprocess_exec(
            *args, "connector", "run", "--config", f"{CONFIG_DIR}/connector.yaml",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output = asyncio.ensure_future(proc.stdout.read())  # type: ignore[union-attr]
        try:
            try:
                await wait_ready(port, proc)
            except (AssertionError, TimeoutError) as exc:  # the connector's log says why
                await kill(proc)
                log = (await output).decode(errors="replace")
                raise AssertionError(f"{exc}; its output:\n{log[-5000:]}") from exc
            connector_pid = leaf_process(proc.pid)
            assert process_ids(connector_pid) == (10001, 10001)
            n = 30
            await produce(
                kafka_bootstrap,
                names.input,
                [(f"u-{i % 5}".encode(), event(f"img-{i}", user=f"u-{i % 5}")) for i in range(n)],
            )
            await wait_until_committed(kafka_bootstrap, names.group, names.input)
            async with httpx.AsyncClient() as http:
                metrics = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
            assert "threads_connector_threads_created_total" in metrics
            os.kill(connector_pid, signal.SIGTERM)  # the drain; buildah would not pass it on
            code = await asyncio.wait_for(proc.wait(), 60)
        finally:
            if proc.returncode is None:
                await kill(proc)
        log = (await output).decode(errors="replace")
        assert code == 0, log[-5000:]
        assert sim.store.count_by_event_id() == {f"img-{i}": 1 for i in range(n)}
    out = await results(kafka_bootstrap, names.results)
    assert sorted(r["eventId"] for r in out) == sorted(f"img-{i}" for i in range(n))
    assert "draining" in log
    assert API_KEY not in log
    after = await asyncio.to_thread(root_filesystem, container)
    changed = sorted(set(before.items()) ^ set(after.items()))
    assert changed == [], f"the connector wrote to the root filesystem: {changed[:20]}"


# -- helpers ----------------------------------------------------------------------------------


def connector_config(bootstrap: str, base_url: str, names: Names, port: int) -> dict[str, Any]:
    """A config file for the test's topics (the API key comes from the environment)."""
    return {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "group_id": names.group,
            "input_topics": [names.input],
            "results_topic": names.results,
            "dead_letter_topic": names.dead,
            "topic_partitions": 2,
            "session_timeout_ms": 10_000,
            "heartbeat_interval_ms": 1_000,
        },
        "delivery": {
            "commit_interval_ms": 100,
            "instance_id": uuid.uuid4().hex[:8],
            "drain_timeout_s": 10,
            "revoke_timeout_s": 10,
        },
        "api": {
            "base_url": base_url,
            "rate_limit_per_s": 500,
            "rate_limit_burst": 50,
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.5,
            "request_timeout_s": 5,
        },
        "routes": ROUTES,
        "server": {"host": "127.0.0.1", "port": port},
        "logging": {"level": "INFO", "format": "json"},
    }


async def wait_ready(port: int, proc: asyncio.subprocess.Process, timeout_s: float = 90) -> None:
    """Until the connector in the image answers /readyz (it joined the group)."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=2) as http:
        while True:
            if proc.returncode is not None:
                raise AssertionError(f"the connector exited with {proc.returncode}")
            try:
                if (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the connector in the image not ready after {timeout_s} s")
            await asyncio.sleep(0.25)


def children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def leaf_process(pid: int) -> int:
    """The innermost process under ``pid``: the command ``buildah run`` started."""
    tree = children()
    while tree.get(pid):
        (pid,) = tree[pid]
    return pid


def descendants(pid: int) -> list[int]:
    """Every process under ``pid``, children before their own children."""
    tree = children()
    found: list[int] = []
    todo = [pid]
    while todo:
        below = tree.get(todo.pop(), [])
        found += below
        todo += below
    return found


async def kill(proc: asyncio.subprocess.Process) -> None:
    """``buildah run`` and what it started: killed alone, buildah leaves its chroot helper
    and the connector running, reparented to init."""
    for pid in reversed(descendants(proc.pid)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.kill()
    await proc.wait()


def process_ids(pid: int) -> tuple[int, int]:
    """(real uid, real gid) of a process."""
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(status["Uid"].split()[0]), int(status["Gid"].split()[0])


def root_filesystem(container: str) -> dict[str, tuple[int, int, int]]:
    """{path: (mode, size, mtime_ns)} of the container's root filesystem, outside the places
    that stay writable with a read-only root (see WRITABLE)."""
    mount = Path(buildah("mount", container).stdout.strip())
    try:
        files: dict[str, tuple[int, int, int]] = {}
        for directory, dirnames, filenames in os.walk(mount):
            rel = "/" + os.path.relpath(directory, mount).lstrip(".")
            dirnames[:] = [d for d in dirnames if f"{rel.rstrip('/')}/{d}" not in WRITABLE]
            for name in [*filenames, *dirnames]:
                path = f"{rel.rstrip('/')}/{name}"
                if path in WRITABLE:
                    continue
                st = os.lstat(os.path.join(directory, name))
                files[path] = (st.st_mode, st.st_size, st.st_mtime_ns)
        return files
    finally:
        buildah("umount", container)
