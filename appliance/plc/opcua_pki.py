"""The OPC UA certificate store under ``<state_dir>/pki``.

::

    pki/own/cert.der            the server's certificate (created on first start, public)
    pki/own/private/key.pem     its private key (0600, created on first start)
    pki/trusted/                client certificates allowed to connect (.der or .pem)
    pki/rejected/               certificates of clients that tried and were not trusted

A client whose certificate is not in ``trusted/`` is refused (BadCertificateUntrusted) and its
certificate is written to ``rejected/``; an administrator trusts it by moving that file into
``trusted/``.  The trust list is re-read on every session, so no restart is needed.  Trust is
direct: the client's own certificate must be in ``trusted/`` (self-signed or CA-issued alike).

``rejected/`` keeps at most :data:`REJECTED_MAX` certificates, none older than
:data:`REJECTED_MAX_AGE` (the oldest go first; a client that tries again is young again), so
clients that keep making new certificates cannot fill the disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

from asyncua import ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.cert_gen import generate_private_key, generate_self_signed_app_certificate
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

log = logging.getLogger(__name__)

CERT_DAYS = 5 * 365
RENEW_BEFORE = timedelta(days=30)
REJECTED_MAX = 200
"""Most certificates kept in ``rejected/``."""
REJECTED_MAX_AGE = timedelta(days=30)
"""A rejected certificate nobody tried again for this long is deleted."""


def thumbprint(cert: x509.Certificate) -> str:
    """SHA-1 thumbprint in hex, as OPC UA tools show it."""
    return hashlib.sha1(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


class Pki:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.cert_path = root / "own" / "cert.der"
        self.key_path = root / "own" / "private" / "key.pem"
        self.trusted = root / "trusted"
        self.rejected = root / "rejected"

    def ensure_server_certificate(self, application_uri: str, hostnames: list[str]) -> bool:
        """Create the key and certificate if missing, expiring, or made for another URI/host.

        Blocking (key generation); returns whether a new certificate was written.  The key is
        kept when only the certificate is renewed.
        """
        for folder in (self.trusted, self.rejected, self.cert_path.parent):
            folder.mkdir(parents=True, exist_ok=True)
        self.prune_rejected()
        self.key_path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.key_path.parent, 0o700)
        had_certificate = self.cert_path.is_file()  # clients may trust it: replacing it is news
        if self.key_path.is_file():
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
            if not isinstance(key, rsa.RSAPrivateKey):
                raise ValueError(f"{self.key_path}: not an RSA key")
            reason = self._renewal_reason(application_uri, hostnames, key)
        else:
            key = generate_private_key()
            _write_private(self.key_path, key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
            reason = "its private key was missing"  # a new key needs a new certificate
        if reason is None:
            return False
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(application_uri)]
        names += [x509.DNSName(h) for h in hostnames]
        cert = generate_self_signed_app_certificate(
            key, "Defect appliance OPC UA server", {"organizationName": "defect-appliance"}, names,
            extended=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], days=CERT_DAYS)
        tmp = self.cert_path.with_suffix(".tmp")
        tmp.write_bytes(cert.public_bytes(serialization.Encoding.DER))
        os.replace(tmp, self.cert_path)
        if had_certificate:
            log.warning("OPC UA server certificate %s replaced (%s); thumbprint %s — clients that "
                        "trusted the old one must trust this one", self.cert_path, reason, thumbprint(cert))
        else:
            log.info("OPC UA server certificate %s created; thumbprint %s", self.cert_path, thumbprint(cert))
        return True

    def _renewal_reason(self, application_uri: str, hostnames: list[str],
                        key: rsa.RSAPrivateKey) -> str | None:
        if not self.cert_path.is_file():
            return "there was none"
        try:
            cert = x509.load_der_x509_certificate(self.cert_path.read_bytes())
        except ValueError:
            return "the old file was not a DER certificate"
        public = cert.public_key()
        if not isinstance(public, rsa.RSAPublicKey) or public != key.public_key():
            return "the old one did not match the key"
        if cert.not_valid_after_utc - RENEW_BEFORE < datetime.now(UTC):
            return "the old one expires soon"
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if application_uri not in san.get_values_for_type(x509.UniformResourceIdentifier):
            return "the application URI changed"
        if not set(hostnames) <= set(san.get_values_for_type(x509.DNSName)):
            return "the host name changed"
        return None

    def trusted_thumbprints(self) -> set[str]:
        found = set()
        for path in self.trusted.glob("*"):
            if path.suffix.lower() not in (".der", ".pem", ".crt"):
                continue
            try:
                data = path.read_bytes()
                cert = (x509.load_pem_x509_certificate(data) if data.lstrip().startswith(b"-----")
                        else x509.load_der_x509_certificate(data))
            except (OSError, ValueError) as exc:
                log.warning("OPC UA trust list: ignoring %s (%s)", path, exc)
                continue
            found.add(thumbprint(cert))
        return found

    async def validate(self, cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
        """asyncua certificate validator (CreateSession's client certificate): see :meth:`check`."""
        self.check(cert, app)

    def check(self, cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
        """Raise a ServiceError unless ``cert`` may connect for the application ``app``."""
        now = datetime.now(UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise ServiceError(ua.StatusCodes.BadCertificateTimeInvalid)
        if thumbprint(cert) not in self.trusted_thumbprints():
            path, new = self._reject(cert, app)
            (log.warning if new else log.debug)(  # once per certificate, however often the client retries
                "OPC UA client %r refused: its certificate is not trusted. To trust it, move %s into %s/",
                app.ApplicationUri, path, self.trusted)
            raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)
        with contextlib.suppress(x509.ExtensionNotFound):
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            if app.ApplicationUri not in san.get_values_for_type(x509.UniformResourceIdentifier):
                raise ServiceError(ua.StatusCodes.BadCertificateUriInvalid)

    def _reject(self, cert: x509.Certificate, app: ua.ApplicationDescription) -> tuple[Path, bool]:
        """Keep the refused certificate in ``rejected/``; returns its path and whether it is new."""
        names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        common = str(names[0].value) if names else (app.ApplicationUri or "client")
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", common)[:60]
        path = self.rejected / f"{safe}[{thumbprint(cert)}].der"
        try:
            if path.exists():
                os.utime(path)  # tried again: kept the longest
                return path, False
            self.rejected.mkdir(parents=True, exist_ok=True)
            path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
        except OSError as exc:
            log.error("cannot write rejected certificate %s: %s", path, exc)
        self.prune_rejected()
        return path, True

    def prune_rejected(self) -> None:
        """Delete rejected certificates beyond :data:`REJECTED_MAX` or older than :data:`REJECTED_MAX_AGE`,
        oldest first."""
        try:
            entries = sorted(((p.stat().st_mtime, p) for p in self.rejected.glob("*.der")), reverse=True)
        except OSError:  # a file went away while listed (an administrator moved it): next time
            return
        oldest = datetime.now(UTC).timestamp() - REJECTED_MAX_AGE.total_seconds()
        stale = [p for i, (mtime, p) in enumerate(entries) if i >= REJECTED_MAX or mtime < oldest]
        for path in stale:
            with contextlib.suppress(OSError):  # gone already, or not ours to delete: next time
                path.unlink()
        if stale:
            log.info("OPC UA: deleted %d old rejected certificate(s) from %s (at most %d are kept, none older "
                     "than %d days)", len(stale), self.rejected, REJECTED_MAX, REJECTED_MAX_AGE.days)


def default_hostnames(listen_host: str) -> list[str]:
    """DNS names for the server certificate: this host, localhost, and the listen host if a name."""
    names = [socket.gethostname(), "localhost"]
    if listen_host not in ("0.0.0.0", "::", "") and not re.fullmatch(r"[\d.:]+", listen_host):
        names.append(listen_host)
    return list(dict.fromkeys(names))


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
