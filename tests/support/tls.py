"""A throwaway certificate authority for TLS tests: CA, server and client certificates.

Made at test time with `cryptography` (EC P-256, valid for a day), the same shape as the
openssl commands in deploy/tls/README.md: a CA that may sign only end-entity certificates,
server certificates for 127.0.0.1/localhost, and client certificates whose common name is
the broker user (Mosquitto's `use_identity_as_username`).
"""

from __future__ import annotations

import ipaddress
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.support.broker import close_client
from tests.support.net import LOOPBACK
from tests.support.waiting import wait_until

VALID = timedelta(days=1)


@dataclass(frozen=True)
class CertFiles:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


class TestCA:
    """A CA in `directory` (ca.crt) that issues server and client certificates into it."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, name: str = "EMU test CA") -> None:
        self.directory = directory
        self._now = datetime.now(UTC)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            self._builder(self._name, self._key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert = directory / "ca.crt"
        self.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey
                 ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(self._name)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(self._now - timedelta(minutes=5))
            .not_valid_after(self._now + VALID)
        )

    def _issue(self, stem: str, common_name: str, usage: x509.ObjectIdentifier,
               sans: list[x509.GeneralName] | None = None) -> CertFiles:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = (
            self._builder(subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        files = CertFiles(self.directory / f"{stem}.crt", self.directory / f"{stem}.key")
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files.key.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))
        files.key.chmod(0o600)
        return files

    def server(self, stem: str = "server") -> CertFiles:
        """A server certificate for localhost and 127.0.0.1."""
        sans: list[x509.GeneralName] = [
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK)),
        ]
        return self._issue(stem, "localhost", ExtendedKeyUsageOID.SERVER_AUTH, sans)

    def client(self, common_name: str) -> CertFiles:
        """A client certificate whose common name is `common_name` (the broker user)."""
        return self._issue(f"client-{common_name}", common_name,
                           ExtendedKeyUsageOID.CLIENT_AUTH)


def mqtt_verdict(port: int, ca: Path, cert: CertFiles | None, timeout: float = 10.0) -> str:
    """'connected', or how the broker on 127.0.0.1:`port` turned a TLS client away."""
    outcome: list[str] = []
    done = threading.Event()
    client = Client(CallbackAPIVersion.VERSION2, client_id=f"tls-{uuid.uuid4().hex[:8]}",
                    protocol=MQTTProtocolVersion.MQTTv5)
    client.tls_set(ca_certs=str(ca), certfile=str(cert.cert) if cert else None,
                   keyfile=str(cert.key) if cert else None)

    def on_connect(_c: Client, _u: object, _f: ConnectFlags, reason: ReasonCode,
                   _p: Properties | None) -> None:
        outcome.append(f"refused {reason}" if reason.is_failure else "connected")
        done.set()

    def on_disconnect(_c: Client, _u: object, _f: DisconnectFlags, reason: ReasonCode,
                      _p: Properties | None) -> None:
        outcome.append(f"disconnected {reason}")
        done.set()

    def on_connect_fail(_c: Client, _u: object) -> None:
        outcome.append("connection failed")
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_connect_fail = on_connect_fail
    client.connect_async(LOOPBACK, port)
    client.loop_start()
    try:
        wait_until(done, timeout, "the broker's verdict on the client")
    finally:
        close_client(client)
    return outcome[0]
