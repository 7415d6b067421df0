"""Certificates made at test time (``cryptography``): a CA, a broker certificate for
127.0.0.1/localhost, client certificates, and a second CA nobody trusts. Files are PEM;
the broker's keystore is one PEM file with its PKCS#8 key and certificate, which Kafka
reads with ``ssl.keystore.type=PEM``."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA certificate the broker and the connector trust
    rogue_ca: Path  # a CA that signed nothing of ours
    broker_keystore: Path  # key + certificate, PEM
    client_cert: Path
    client_key: Path  # encrypted with client_key_password
    client_key_password: str
    rogue_client_cert: Path  # signed by the rogue CA
    rogue_client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey, password: str | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode())
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in
            ("ca", "rogue", "broker", "client", "rogue-client")}  # fmt: skip
    ca = _cert("test-ca", keys["ca"], None, ca=True)
    rogue = _cert("rogue-ca", keys["rogue"], None, ca=True)
    broker = _cert("localhost", keys["broker"], ("test-ca", keys["ca"]), server=True)
    client = _cert("connector", keys["client"], ("test-ca", keys["ca"]))
    rogue_client = _cert("connector", keys["rogue-client"], ("rogue-ca", keys["rogue"]))
    files = {
        "ca.pem": _pem(ca),
        "rogue-ca.pem": _pem(rogue),
        "broker-keystore.pem": _key_pem(keys["broker"]) + _pem(broker),
        "client.pem": _pem(client),
        "client.key": _key_pem(keys["client"], "client-key-pw-3c2b"),
        "rogue-client.pem": _pem(rogue_client),
        "rogue-client.key": _key_pem(keys["rogue-client"]),
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return Pki(
        ca=directory / "ca.pem",
        rogue_ca=directory / "rogue-ca.pem",
        broker_keystore=directory / "broker-keystore.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        client_key_password="client-key-pw-3c2b",
        rogue_client_cert=directory / "rogue-client.pem",
        rogue_client_key=directory / "rogue-client.key",
    )


def secure_broker_config(pki: Pki) -> dict[str, str]:
    """server.properties for a SASL_SSL listener named SECURE (SCRAM-SHA-512) and an SSL
    listener named MTLS that requires a client certificate."""
    jaas = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    return {
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(pki.broker_keystore),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(pki.ca),
        "sasl.enabled.mechanisms": "SCRAM-SHA-512",
        "listener.name.secure.scram-sha-512.sasl.jaas.config": jaas,
        "listener.name.mtls.ssl.client.auth": "required",
    }
