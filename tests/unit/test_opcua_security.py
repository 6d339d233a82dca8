"""OPC UA users, roles and certificates, without a server."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from asyncua import ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.cert_gen import generate_private_key, generate_self_signed_app_certificate
from asyncua.crypto.permission_rules import User, UserRole
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from appliance.config import OpcUaConfig, OpcUaUser
from appliance.errors import UserError
from appliance.plc import opcua_pki
from appliance.plc.opcua_pki import Pki, thumbprint
from appliance.plc.opcua_security import (
    OPERATOR,
    READER,
    AccountManager,
    ApplianceUser,
    load_accounts,
    may_operate,
)


def _config(*users: OpcUaUser) -> OpcUaConfig:
    return OpcUaConfig(users=list(users))


def test_passwords_come_from_the_environment_and_systemd_credentials(tmp_path: Path) -> None:
    (tmp_path / "scada-pw").write_text("from-credential\n")
    cfg = _config(OpcUaUser(name="plc", role="operator", password_env="PLC_PW"),
                  OpcUaUser(name="scada", role="reader", password_credential="scada-pw"))
    accounts, generated = load_accounts(cfg, {"PLC_PW": "from-env", "CREDENTIALS_DIRECTORY": str(tmp_path)},
                                        generated_file=tmp_path / "generated")
    assert generated is None and not (tmp_path / "generated").exists()
    assert [(a.name, a.role, a.password) for a in accounts] == [
        ("plc", OPERATOR, "from-env"), ("scada", READER, "from-credential")]
    assert "from-env" not in repr(accounts)


@pytest.mark.parametrize(("user", "env", "message"), [
    (OpcUaUser(name="plc", role="operator", password_env="PLC_PW"), {}, "PLC_PW is not set"),
    (OpcUaUser(name="plc", role="operator"), {}, "exactly one of"),
    (OpcUaUser(name="plc", role="operator", password_env="A", password_credential="b"), {"A": "x"},
     "exactly one of"),
    (OpcUaUser(name="plc", role="operator", password_credential="pw"), {}, "CREDENTIALS_DIRECTORY"),
    (OpcUaUser(name="plc", role="operator", password_credential="../pw"), {"CREDENTIALS_DIRECTORY": "/x"},
     "invalid credential name"),
    (OpcUaUser(name="plc", role="operator", password_credential="missing"),
     {"CREDENTIALS_DIRECTORY": "/nonexistent"}, "cannot read credential"),
])
def test_a_user_without_a_usable_password_stops_the_start(user: OpcUaUser, env: dict[str, str],
                                                           message: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=message):
        load_accounts(_config(user), env, generated_file=tmp_path / "generated")


def test_the_demo_user_from_the_environment_is_an_operator(tmp_path: Path) -> None:
    kept = tmp_path / "generated"
    accounts, generated = load_accounts(_config(), {"APPLIANCE_OPCUA_USER": "demo",
                                                    "APPLIANCE_OPCUA_PASSWORD": "demo-pw"}, generated_file=kept)
    assert generated is None and [(a.name, a.role) for a in accounts] == [("demo", OPERATOR)]
    with pytest.raises(UserError, match="both"):
        load_accounts(_config(), {"APPLIANCE_OPCUA_USER": "demo"}, generated_file=kept)
    with pytest.raises(UserError, match="defined twice"):
        load_accounts(_config(OpcUaUser(name="demo", role="reader", password_env="X")),
                      {"X": "x", "APPLIANCE_OPCUA_USER": "demo", "APPLIANCE_OPCUA_PASSWORD": "y"}, generated_file=kept)


def test_without_any_user_one_operator_password_is_generated_once_and_kept_private(tmp_path: Path) -> None:
    kept = tmp_path / "state" / "credentials" / "opcua-operator"
    (first,), generated = load_accounts(_config(), {}, generated_file=kept)
    assert generated is first and first.role == OPERATOR and len(first.password) >= 16
    assert kept.read_text() == first.password
    assert stat.S_IMODE(os.stat(kept).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(kept.parent).st_mode) == 0o700
    (second,), _ = load_accounts(_config(), {}, generated_file=kept)  # the next start: the same login
    assert second.password == first.password
    kept.unlink()
    (third,), _ = load_accounts(_config(), {}, generated_file=kept)  # deleted: a new one
    assert third.password != first.password and kept.read_text() == third.password


def test_a_generated_password_that_cannot_be_kept_stops_the_start(tmp_path: Path) -> None:
    (tmp_path / "credentials").write_text("a file where the folder should be")
    with pytest.raises(UserError, match=r"cannot be kept in .*credentials/opcua-operator"):
        load_accounts(_config(), {}, generated_file=tmp_path / "credentials" / "opcua-operator")


def test_logins_check_password_and_give_the_role(tmp_path: Path) -> None:
    accounts, _ = load_accounts(_config(OpcUaUser(name="plc", role="operator", password_env="A"),
                                        OpcUaUser(name="scada", role="reader", password_env="B")),
                                {"A": "pa", "B": "pb"}, generated_file=tmp_path / "generated")
    manager = AccountManager(accounts)
    plc = manager.get_user(None, "plc", "pa")
    scada = manager.get_user(None, "scada", "pb")
    assert isinstance(plc, ApplianceUser) and plc.access == OPERATOR and plc.role == UserRole.User
    assert isinstance(scada, ApplianceUser) and scada.access == READER
    assert manager.get_user(None, "plc", "pb") is None
    assert manager.get_user(None, "nobody", "pa") is None
    assert manager.get_user(None, "plc", None) is None
    assert manager.get_user(None) is None  # anonymous
    assert may_operate(plc) and not may_operate(scada) and not may_operate(None)
    assert may_operate(User(role=UserRole.Admin))  # the server's own session
    anonymous = AccountManager(accounts, allow_anonymous=True).get_user(None)
    assert isinstance(anonymous, ApplianceUser) and anonymous.access == READER


# -- certificates ----------------------------------------------------------------------------------
def _client_cert(uri: str = "urn:test:client") -> x509.Certificate:
    key = generate_private_key()
    return generate_self_signed_app_certificate(
        key, "test client", {}, [x509.UniformResourceIdentifier(uri), x509.DNSName("localhost")],
        extended=[ExtendedKeyUsageOID.CLIENT_AUTH], days=30)


def _expired_cert() -> x509.Certificate:
    key = generate_private_key()
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "expired client")])
    now = datetime.now(UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=10)).not_valid_after(now - timedelta(days=1))
            .sign(key, hashes.SHA256()))


def _app(uri: str = "urn:test:client") -> ua.ApplicationDescription:
    return ua.ApplicationDescription(ApplicationUri=uri)


def test_server_certificate_is_created_once_with_a_private_key(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    assert pki.ensure_server_certificate("urn:host:appliance", ["host", "localhost"]) is True
    assert stat.S_IMODE(os.stat(pki.key_path).st_mode) == 0o600
    cert = x509.load_der_x509_certificate(pki.cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:host:appliance"]
    assert set(san.get_values_for_type(x509.DNSName)) == {"host", "localhost"}
    assert cert.not_valid_after_utc - datetime.now(UTC) > timedelta(days=4 * 365)
    assert pki.ensure_server_certificate("urn:host:appliance", ["host", "localhost"]) is False
    assert pki.cert_path.read_bytes() == cert.public_bytes(serialization.Encoding.DER)
    key = pki.key_path.read_bytes()
    assert pki.ensure_server_certificate("urn:host:appliance", ["renamed"]) is True  # new host name
    assert pki.key_path.read_bytes() == key  # the key stays
    assert (pki.trusted.is_dir(), pki.rejected.is_dir()) == (True, True)


def test_a_first_certificate_is_announced_plainly_and_a_replaced_one_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Created where there was none: INFO with the thumbprint, nothing about an "old one".  Replaced
    (host renamed, key lost): WARNING, why, and that clients must trust the new one."""
    pki = Pki(tmp_path / "pki")

    def logged() -> list[tuple[int, str]]:
        rows = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "appliance.plc.opcua_pki"]
        caplog.clear()
        return rows

    def current() -> str:
        return thumbprint(x509.load_der_x509_certificate(pki.cert_path.read_bytes()))

    with caplog.at_level(logging.DEBUG, logger="appliance.plc.opcua_pki"):
        pki.ensure_server_certificate("urn:host:appliance", ["host"])
        assert logged() == [(logging.INFO, f"OPC UA server certificate {pki.cert_path} created; "
                                           f"thumbprint {current()}")]
        pki.ensure_server_certificate("urn:host:appliance", ["host"])
        assert logged() == []  # kept: nothing to say
        pki.ensure_server_certificate("urn:host:appliance", ["renamed"])
        assert logged() == [(logging.WARNING, f"OPC UA server certificate {pki.cert_path} replaced (the host "
                                              f"name changed); thumbprint {current()} — clients that trusted "
                                              "the old one must trust this one")]
        pki.key_path.unlink()
        pki.ensure_server_certificate("urn:host:appliance", ["renamed"])
        [(level, message)] = logged()
        assert level == logging.WARNING and "replaced (its private key was missing)" in message
        assert current() in message
        pki.cert_path.unlink()  # the certificate deleted, the key kept: no old one any more
        pki.ensure_server_certificate("urn:host:appliance", ["renamed"])
        [(level, message)] = logged()
        assert level == logging.INFO and message.endswith(f"created; thumbprint {current()}")


def test_an_unknown_client_certificate_lands_in_rejected_until_moved_to_trusted(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    pki.ensure_server_certificate("urn:host:appliance", ["localhost"])
    cert = _client_cert()
    with pytest.raises(ServiceError) as refused:
        asyncio.run(pki.validate(cert, _app()))
    assert refused.value.code == ua.StatusCodes.BadCertificateUntrusted
    (rejected,) = pki.rejected.iterdir()
    assert thumbprint(cert) in rejected.name and rejected.suffix == ".der"
    rejected.rename(pki.trusted / rejected.name)
    asyncio.run(pki.validate(cert, _app()))  # trusted now, no restart
    with pytest.raises(ServiceError) as wrong_uri:
        asyncio.run(pki.validate(cert, _app("urn:someone:else")))
    assert wrong_uri.value.code == ua.StatusCodes.BadCertificateUriInvalid


def test_pem_certificates_in_trusted_count_and_expired_ones_are_refused(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    pki.ensure_server_certificate("urn:host:appliance", ["localhost"])
    cert = _client_cert()
    (pki.trusted / "client.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (pki.trusted / "notes.txt").write_text("ignored")
    (pki.trusted / "broken.der").write_bytes(b"not a certificate")
    asyncio.run(pki.validate(cert, _app()))
    expired = _expired_cert()
    with pytest.raises(ServiceError) as refused:
        asyncio.run(pki.validate(expired, _app()))
    assert refused.value.code == ua.StatusCodes.BadCertificateTimeInvalid


def test_rejected_certificates_are_capped_by_count_and_age_oldest_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(opcua_pki, "REJECTED_MAX", 3)
    pki = Pki(tmp_path / "pki")
    pki.ensure_server_certificate("urn:host:appliance", ["localhost"])
    now = datetime.now(UTC).timestamp()

    def refuse(cert: x509.Certificate, age_days: float) -> Path:
        with pytest.raises(ServiceError):
            pki.check(cert, _app())
        (path,) = [p for p in pki.rejected.iterdir() if thumbprint(cert) in p.name]
        os.utime(path, (now - age_days * 86400,) * 2)
        return path

    ancient = refuse(_client_cert(), 40)  # older than REJECTED_MAX_AGE: goes at the next refusal
    first, second = refuse(_client_cert(), 3), refuse(_client_cert(), 2)
    third = refuse(_client_cert(), 1)
    assert not ancient.exists() and {first, second, third} == set(pki.rejected.iterdir())
    with pytest.raises(ServiceError):  # the first client tries again: it is the youngest now
        pki.check(x509.load_der_x509_certificate(first.read_bytes()), _app())
    newest = refuse(_client_cert(), 0)
    assert set(pki.rejected.iterdir()) == {first, third, newest}  # the oldest went, three are kept
