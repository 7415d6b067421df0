"""The lock files agree with pyproject.toml.

requirements.lock (what the image installs, by hash) and requirements-dev.lock (the dev and
CI environment) are written by ``make lock`` (uv pip compile --universal --generate-hashes).
When pyproject's dependencies change, these tests say which pin is missing, outside its
range or no longer wanted, and that ``make lock`` fixes it. The image build's ``pip check``
(Dockerfile) proves the other half: the locked set satisfies every requirement of the wheel
and of the locked packages themselves.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_LOCK = ROOT / "requirements.lock"
DEV_LOCK = ROOT / "requirements-dev.lock"
PROJECT = "threads-connector (pyproject.toml)"  # how uv names pyproject in "# via"
STALE = "is stale: run `make lock` (see the Makefile) and commit both lock files"
# The image: CPython 3.11 on Linux (x86_64 and aarch64 wheels are both hashed in the lock).
IMAGE_ENV = {
    "python_version": "3.11",
    "python_full_version": "3.11.2",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "os_name": "posix",
    "platform_python_implementation": "CPython",
    "implementation_name": "cpython",
}


@dataclass
class Pin:
    name: str
    version: str
    marker: str
    hashes: list[str] = field(default_factory=list)
    via: list[str] = field(default_factory=list)

    def applies_to_image(self, machine: str = "x86_64") -> bool:
        if not self.marker:
            return True
        return Marker(self.marker).evaluate({**IMAGE_ENV, "platform_machine": machine})


PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]*?))?\s*\\?$")


def parse_lock(path: Path) -> list[Pin]:
    """The pins of a requirements file as uv writes it (pins, --hash lines, # via lines)."""
    pins: list[Pin] = []
    for line in path.read_text().splitlines():
        match = PIN.match(line)
        if match:
            pins.append(Pin(canonicalize_name(match[1]), match[2], (match[3] or "").strip()))
        elif pins and (hashes := re.findall(r"--hash=(\S+)", line)):
            pins[-1].hashes.extend(hashes)
        elif pins and (via := re.match(r"^\s+#\s+(?:via\s+)?(?!via$)(\S.*)$", line)):
            pins[-1].via.append(via[1].strip())
    return pins


def project_requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    texts = list(project["dependencies"])
    for extra in extras:
        texts += project["optional-dependencies"][extra]
    return [Requirement(text) for text in texts]


LOCKS = [
    pytest.param(RUNTIME_LOCK, (), id="requirements.lock"),
    pytest.param(DEV_LOCK, ("dev",), id="requirements-dev.lock"),
]


@pytest.mark.parametrize(("lock", "extras"), LOCKS)
def test_every_dependency_of_pyproject_is_pinned(lock: Path, extras: tuple[str, ...]) -> None:
    pins = {p.name: p for p in parse_lock(lock)}
    problems = []
    for req in project_requirements(*extras):
        if req.marker is not None and not req.marker.evaluate(IMAGE_ENV):
            continue
        pin = pins.get(canonicalize_name(req.name))
        if pin is None:
            problems.append(f"{req} is not pinned")
        elif not req.specifier.contains(pin.version, prereleases=True):
            problems.append(f"{req} but {lock.name} pins {pin.name}=={pin.version}")
    assert not problems, f"{lock.name} {STALE}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize(("lock", "extras"), LOCKS)
def test_no_pin_for_a_dependency_pyproject_dropped(lock: Path, extras: tuple[str, ...]) -> None:
    """A package the lock says pyproject asked for, which pyproject no longer lists."""
    wanted = {canonicalize_name(r.name) for r in project_requirements(*extras)}
    dropped = [p.name for p in parse_lock(lock) if PROJECT in p.via and p.name not in wanted]
    assert not dropped, f"{lock.name} {STALE}: pyproject no longer lists {', '.join(dropped)}"


@pytest.mark.parametrize(("lock", "extras"), LOCKS)
def test_every_pin_is_exact_and_hashed(lock: Path, extras: tuple[str, ...]) -> None:
    pins = parse_lock(lock)
    assert pins, f"no pins read from {lock.name}"
    assert not [p.name for p in pins if not p.hashes], "pins without --hash: pip would refuse"
    # every line that names a package is a pin this parser understood
    names = [
        line.split()[0]
        for line in lock.read_text().splitlines()
        if line and not line[0].isspace() and not line.startswith("#")
    ]
    assert len(names) == len(pins), names


def test_dev_environment_runs_the_image_versions() -> None:
    """requirements-dev.lock is constrained by requirements.lock: the tests run on exactly
    the versions the image ships."""
    runtime = {p.name: p.version for p in parse_lock(RUNTIME_LOCK)}
    dev = {p.name: p.version for p in parse_lock(DEV_LOCK)}
    differ = {name: (v, dev.get(name)) for name, v in runtime.items() if dev.get(name) != v}
    assert not differ, f"requirements-dev.lock {STALE}: {differ}"


def test_the_image_gets_a_wheel_for_both_architectures() -> None:
    """Every package the image installs has a pin on linux x86_64 and aarch64 alike (the lock
    is universal: the hashes cover each platform's wheels)."""
    pins = parse_lock(RUNTIME_LOCK)
    x86 = {p.name for p in pins if p.applies_to_image("x86_64")}
    arm = {p.name for p in pins if p.applies_to_image("aarch64")}
    assert x86 == arm
    assert {canonicalize_name(r.name) for r in project_requirements()} <= x86


def test_parse_lock_reads_what_uv_writes(tmp_path: Path) -> None:
    lock = tmp_path / "r.lock"
    lock.write_text(
        "# This file was autogenerated by uv via the following command:\n"
        "#    make lock\n"
        "Colorama==0.4.6 ; sys_platform == 'win32' \\\n"
        "    --hash=sha256:aa \\\n"
        "    --hash=sha256:bb\n"
        "    # via pytest\n"
        "httpx==0.28.1 \\\n"
        "    --hash=sha256:cc\n"
        "    # via\n"
        "    #   -c requirements.lock\n"
        f"    #   {PROJECT}\n"
    )
    colorama, httpx = parse_lock(lock)
    assert (colorama.name, colorama.version, colorama.marker) == (
        "colorama",
        "0.4.6",
        "sys_platform == 'win32'",
    )
    assert colorama.hashes == ["sha256:aa", "sha256:bb"] and colorama.via == ["pytest"]
    assert not colorama.applies_to_image()
    assert (httpx.version, httpx.marker, httpx.hashes) == ("0.28.1", "", ["sha256:cc"])
    assert httpx.via == ["-c requirements.lock", PROJECT]
