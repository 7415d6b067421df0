"""The HTTP egress proxy of the Threads API calls, decided once at start-up.

Where the proxy comes from, first match wins:

1. ``api.proxy_url`` (an ``http://host:port`` forward proxy; ``NO_PROXY`` does not apply:
   it was asked for explicitly);
2. the standard environment, as curl and most HTTP clients read it: ``HTTPS_PROXY`` for an
   ``https://`` base URL, ``HTTP_PROXY`` for ``http://`` (lower-case names too), unless
   ``NO_PROXY`` names the API's host, or its IP address in a CIDR block
   (``api.proxy_from_env: false`` ignores all three);
3. none: the API is called directly.

Proxy credentials come from ``api.proxy_auth_file`` (``user:password``, one line) or from
the environment proxy URL's ``user:password@``; they are never written in
``api.proxy_url`` (refused at start-up), never logged, and sent as
``Proxy-Authorization: Basic`` to the proxy only. An ``https://`` API is reached through
the proxy with ``CONNECT`` (end-to-end TLS to the API); an ``http://`` one as an absolute-URI
request. One base URL means one decision: it is made here, not per request.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

from pydantic import SecretStr

from connector.config import ApiSettings, mask_url
from connector.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Proxy:
    """A forward proxy: its URL without credentials, and the credentials if any."""

    url: str
    source: str  # "api.proxy_url" or the environment variable's name: for the start-up line
    username: str | None = None
    password: SecretStr | None = None

    def describe(self) -> str:
        """For a log line: where it came from and where it is; never the password."""
        auth = f" as {self.username!r}" if self.username is not None else ""
        return f"{self.url} (from {self.source}){auth}"


def resolve(
    api: ApiSettings, environ: Mapping[str, str] | None = None, *, read_credentials: bool = True
) -> Proxy | None:
    """The proxy for ``api.base_url``, or None to call the API directly. Raises
    ConfigError for an unreadable auth file or an environment proxy URL that is not one.
    ``read_credentials=False``: ``api.proxy_auth_file`` is named, not read (check-config)."""
    proxy: Proxy | None
    if api.proxy_url is not None:
        proxy = Proxy(api.proxy_url, "api.proxy_url")
    elif api.proxy_from_env:
        proxy = _from_env(api.base_url, environ)
    else:
        proxy = None
    if proxy is not None and api.proxy_auth_file is not None:
        if not read_credentials:
            return Proxy(proxy.url, proxy.source, f"<user in {api.proxy_auth_file}>")
        username, password = read_auth_file(api.proxy_auth_file)
        proxy = Proxy(proxy.url, proxy.source, username, password)
    return proxy


def _from_env(base_url: str, environ: Mapping[str, str] | None) -> Proxy | None:
    parts = urlsplit(base_url)
    scheme, host = parts.scheme, parts.hostname or ""
    env = os.environ if environ is None else environ
    url = _proxies(env).get(scheme)
    if not url:
        return None
    no_proxy = env.get("no_proxy") or env.get("NO_PROXY") or ""
    if _bypassed(host, parts.port or (443 if scheme == "https" else 80), no_proxy):
        return None
    name = next((n for n in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY") if env.get(n)), "env")
    if "://" not in url:
        url = "http://" + url  # curl's reading of HTTPS_PROXY=host:port
    proxy_parts = urlsplit(url)
    if proxy_parts.scheme != "http" or not proxy_parts.hostname:
        raise ConfigError(
            f"{name}: {mask_url(url)} is not an http:// proxy URL (the connector speaks to "
            f"its proxy in plain HTTP; the API's TLS goes through it end to end)"
        )
    clean = urlunsplit(("http", _hostport(proxy_parts), "", "", ""))
    if proxy_parts.username is None:
        return Proxy(clean, name)
    return Proxy(
        clean,
        name,
        unquote(proxy_parts.username),
        SecretStr(unquote(proxy_parts.password or "")),
    )


def _hostport(parts: SplitResult) -> str:
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{parts.port or 80}"


def _proxies(env: Mapping[str, str]) -> dict[str, str]:
    """``<scheme>_proxy`` by scheme, as ``urllib.request.getproxies_environment`` reads
    them (the lower-case name wins over the upper-case one)."""
    found: dict[str, str] = {}
    for name, value in env.items():
        if value and name.lower().endswith("_proxy") and name.islower():
            found[name[:-6]] = value
    for name, value in env.items():
        if value and name.endswith("_PROXY") and name.isupper():
            found.setdefault(name[:-6].lower(), value)
    return found


def _bypassed(host: str, port: int, no_proxy: str) -> bool:
    """curl's (7.86+) and Go's reading of ``NO_PROXY``: ``*``, or a comma list of host
    names (a leading ``.`` or ``*.`` optional; a name matches itself and its subdomains),
    IP addresses and CIDR blocks (``10.0.0.0/8``, ``fd00::/8``: an API addressed by IP in
    the block), each with an optional ``:port`` (``[v6]:port`` for an IPv6 address)."""
    host = host.lower().strip("[]")
    address = _ip(host)
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        name, entry_port = _split_port(entry)
        if entry_port and entry_port != str(port):
            continue
        if "/" in name:
            if address is not None and _in_block(address, name):
                return True
            continue
        name = name.removeprefix("*").lstrip(".")
        if host == name or host.endswith("." + name):
            return True
    return False


def _split_port(entry: str) -> tuple[str, str]:
    """``host:port``, ``[v6]:port``, ``[v6]`` or a bare address/name (an IPv6 address
    without brackets has no port)."""
    if entry.startswith("["):
        address, _, rest = entry[1:].partition("]")
        return address, rest.removeprefix(":")
    if entry.count(":") == 1:
        name, _, port = entry.partition(":")
        return name, port
    return entry, ""


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _in_block(address: ipaddress.IPv4Address | ipaddress.IPv6Address, block: str) -> bool:
    try:
        return address in ipaddress.ip_network(block, strict=False)
    except ValueError:  # not a CIDR block (or the other IP version): not this host's
        return False


def read_auth_file(path: Path) -> tuple[str, SecretStr]:
    """``user:password`` from a mounted secret file (surrounding whitespace stripped).
    The errors name the file and the problem, never its content."""
    try:
        text = path.read_bytes().decode("utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"api.proxy_auth_file: cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError:
        raise ConfigError(f"api.proxy_auth_file: {path} is not UTF-8 text") from None
    username, sep, password = text.partition(":")
    if not sep or not username or "\n" in text or not text.isascii() or not text.isprintable():
        raise ConfigError(
            f"api.proxy_auth_file: {path} must hold one line user:password "
            "(printable ASCII, the user name not empty)"
        )
    return username, SecretStr(password)
