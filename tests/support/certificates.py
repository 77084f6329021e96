"""Test certificates made with the openssl command line: a CA, a broker and a client.

Contract: `make_certificates(folder)` writes PEM files into `folder` and
returns their paths: a CA, a broker certificate for `localhost` and 127.0.0.1
signed by it (with its PKCS#8 key in one key-store file, as Kafka's PEM key
store wants), a client certificate and key signed by it (mutual TLS), and a
second, unrelated CA (a wrong MAILER_KAFKA_SSL_CA_FILE). `openssl_missing()`
says why the helper cannot run, for a skip.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certificates:
    """Paths of the PEM files `make_certificates` wrote."""

    ca: Path
    broker_keystore: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def openssl_missing() -> str | None:
    """Why certificates cannot be made here, or None."""
    return None if shutil.which("openssl") else "the openssl command is not installed"


def _openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)


def _ca(folder: Path, name: str) -> None:
    _openssl(folder, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}")


def _signed(folder: Path, name: str, subject: str, extensions: str) -> None:
    _openssl(folder, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", subject)
    (folder / f"{name}.ext").write_text(extensions)
    _openssl(folder, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext")


def make_certificates(folder: Path) -> Certificates:
    """Write the CA, broker, client and unrelated-CA files into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    _ca(folder, "ca")
    _ca(folder, "other-ca")
    _signed(folder, "broker", "/CN=localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _openssl(folder, "pkcs8", "-topk8", "-nocrypt", "-in", "broker.key", "-out", "broker.p8")
    keystore = folder / "broker-keystore.pem"
    keystore.write_text((folder / "broker.pem").read_text() + (folder / "broker.p8").read_text())
    _signed(folder, "client", "/CN=mailer", "extendedKeyUsage=clientAuth\n")
    return Certificates(ca=folder / "ca.pem", broker_keystore=keystore,
                        client_cert=folder / "client.pem", client_key=folder / "client.key",
                        other_ca=folder / "other-ca.pem")
