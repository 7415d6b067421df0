"""A private CA and a server certificate it signs, for serving the simulator over https.

The connector must refuse the simulator's certificate unless ``api.ca_file`` names the
CA (``ca.pem``). Made with ``trustme`` (a development dependency), imported only here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the server's certificate chain and key, and the CA that signed it."""

    cert_file: Path
    key_file: Path
    ca_file: Path


def make_private_ca(
    directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
) -> TlsFiles:
    """Write ``ca.pem``, ``server.pem`` and ``server.key`` into ``directory``."""
    import trustme  # a test tool: only needed when the simulator serves https

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert(*hosts)
    files = TlsFiles(directory / "server.pem", directory / "server.key", directory / "ca.pem")
    server.cert_chain_pems[0].write_to_path(str(files.cert_file))
    for pem in server.cert_chain_pems[1:]:
        pem.write_to_path(str(files.cert_file), append=True)
    server.private_key_pem.write_to_path(str(files.key_file))
    ca.cert_pem.write_to_path(str(files.ca_file))
    return files
