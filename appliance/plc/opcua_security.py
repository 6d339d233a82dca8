"""OPC UA security: who may log in (users and roles) and on which channels.

Secure by default.  asyncua alone would accept anonymous users, and it would even activate a
session on an unencrypted (None) channel although no None endpoint is advertised; this module
closes both:

* :class:`AccountManager` knows only the configured users (passwords from the environment or
  systemd credentials, never YAML); anonymous logins exist only in insecure commissioning mode,
  and then with the reader role.
* :class:`SecureInternalServer` creates :class:`SecureSession` objects, which refuse to activate
  on a channel without a client certificate (None security) unless commissioning allows it, and
  which make the calling user available to method handlers (:func:`caller`) — asyncua passes the
  user to writes but not to method calls.

Certificate binding.  asyncua 2.1.0 checks the client certificate sent in CreateSession against
the trust list, and only when one is sent; it never checks the certificate that secured the
channel, although that is the key the client proves it holds (the channel's signatures and
ActivateSession's ClientSignature).  So a client with an untrusted key pair could send a trusted
client's public certificate, or none, and log in.  :meth:`SecureSession.activate_session` checks
the channel's certificate against the trust list and requires CreateSession's certificate to be
present and byte-identical to it (OPC 10000-4 §5.6.2); refusals are logged once per peer host
and audited, as are activated sessions.

Roles: ``reader`` may browse, read, subscribe and query results; ``operator`` may also call the
control methods and write the PLC inputs.  Certificates live in :mod:`appliance.plc.opcua_pki`.
"""

from __future__ import annotations

import contextvars
import hmac
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncua import ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.internal_server import InternalServer
from asyncua.server.internal_session import InternalSession
from asyncua.server.user_managers import UserManager
from cryptography import x509

from appliance.auth import write_private
from appliance.config import OpcUaConfig
from appliance.errors import UserError
from appliance.login_guard import LoginGuard
from appliance.part_text import loggable
from appliance.plc.log_once import PerHost
from appliance.plc.opcua_transport import QUIET_S, current_channel

log = logging.getLogger(__name__)

READER, OPERATOR = "reader", "operator"
DEMO_USER_ENV, DEMO_PASSWORD_ENV = "APPLIANCE_OPCUA_USER", "APPLIANCE_OPCUA_PASSWORD"
GENERATED_USER = "operator"


@dataclass(frozen=True, slots=True)
class Account:
    name: str
    role: str
    password: str = field(repr=False)


@dataclass
class ApplianceUser(User):
    """An authenticated OPC UA user; ``access`` is the appliance role (reader/operator)."""

    access: str = READER


def load_accounts(config: OpcUaConfig, environ: Mapping[str, str] | None = None,
                  credentials_dir: Path | None = None, *,
                  generated_file: Path) -> tuple[list[Account], Account | None]:
    """The configured users with their secrets, plus the demo user from the environment.

    Returns ``(accounts, generated)``: when nobody is configured at all, one operator login is
    generated (``generated``) with a random password kept in ``generated_file`` (0600, in a 0700
    folder) and reused by later starts.  No log line ever holds it: the caller says where it is.
    """
    env = os.environ if environ is None else environ
    if credentials_dir is None and env.get("CREDENTIALS_DIRECTORY"):
        credentials_dir = Path(env["CREDENTIALS_DIRECTORY"])
    accounts: list[Account] = []
    for i, user in enumerate(config.users):
        where = f"opcua.users[{i}] ({user.name})"
        if (user.password_env is None) == (user.password_credential is None):
            raise UserError(f"{where}: set exactly one of password_env or password_credential")
        if user.password_env is not None:
            password = env.get(user.password_env)
            if not password:
                raise UserError(f"{where}: environment variable {user.password_env} is not set or empty")
        else:
            password = _read_credential(where, credentials_dir, str(user.password_credential))
        accounts.append(Account(user.name, user.role, password))
    demo_name, demo_password = env.get(DEMO_USER_ENV), env.get(DEMO_PASSWORD_ENV)
    if demo_name or demo_password:
        if not (demo_name and demo_password):
            raise UserError(f"set both {DEMO_USER_ENV} and {DEMO_PASSWORD_ENV}, or neither")
        accounts.append(Account(demo_name, OPERATOR, demo_password))
    names = [a.name for a in accounts]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"opcua.users: user name(s) defined twice: {', '.join(duplicates)}")
    generated = None
    if not accounts:
        generated = Account(GENERATED_USER, OPERATOR, _generated_password(generated_file))
        accounts.append(generated)
    return accounts, generated


def _generated_password(path: Path) -> str:
    """The generated operator's password from ``path``, made there (0600 in a 0700 folder) if missing."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        if path.is_file() and (password := path.read_text(encoding="utf-8").strip()):
            return password
        password = secrets.token_urlsafe(16)
        write_private(path, password.encode())
    except OSError as exc:
        raise UserError(f"OPC UA: no users configured and the generated operator password cannot be kept "
                        f"in {path}: {exc.strerror or exc}") from exc
    return password


def _read_credential(where: str, credentials_dir: Path | None, name: str) -> str:
    if credentials_dir is None:
        raise UserError(f"{where}: password_credential '{name}' needs systemd's $CREDENTIALS_DIRECTORY "
                        "(LoadCredential=/SetCredentialEncrypted= in the unit)")
    if "/" in name or name.startswith("."):
        raise UserError(f"{where}: invalid credential name '{name}'")
    try:
        password = (credentials_dir / name).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise UserError(f"{where}: cannot read credential {credentials_dir / name}: {exc.strerror}") from None
    if not password:
        raise UserError(f"{where}: credential {credentials_dir / name} is empty")
    return password


class AccountManager(UserManager):
    """Username/password logins against the loaded accounts; anonymous only when allowed.

    With a :class:`LoginGuard`, repeated failures back off and lock the user name and the client's
    address (shared with the API), and every log-in is audited and counted there.  asyncua calls
    this on the event loop, so it stays cheap: a refused attempt is a table look-up, and the
    passwords (secrets from the environment, not hashes) are compared in constant time.
    """

    def __init__(self, accounts: list[Account], allow_anonymous: bool = False,
                 guard: LoginGuard | None = None) -> None:
        self._accounts = {a.name: a for a in accounts}
        self.allow_anonymous = allow_anonymous
        self.guard = guard

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        if username is None and password is None:  # an anonymous token (X509 tokens are not offered)
            if self.allow_anonymous:
                return ApplianceUser(role=UserRole.User, name="anonymous", access=READER)
            return None
        name, peer = username or "", _login_peer.get()
        if self.guard is not None and self.guard.refusal("opcua", name, peer) is not None:
            return None
        account = self._accounts.get(name)
        expected = account.password if account is not None else secrets.token_urlsafe(12)
        given = password if isinstance(password, str) else ""
        # compared in constant time, and also for unknown names, so timing tells nothing
        if not hmac.compare_digest(expected.encode(), given.encode()) or account is None:
            if self.guard is not None:
                self.guard.failed("opcua", name, peer)
            else:
                log.warning("OPC UA login refused for user %s", loggable(name))
            return None
        if self.guard is not None:
            self.guard.succeeded("opcua", name, peer)
        return ApplianceUser(role=UserRole.User, name=account.name, access=account.role)


_login_peer: contextvars.ContextVar[str | None] = contextvars.ContextVar("opcua_login_peer", default=None)
"""The address of the client whose user token is being checked (asyncua's get_user is not told)."""


_caller: contextvars.ContextVar[User | None] = contextvars.ContextVar("opcua_caller", default=None)


def caller() -> User | None:
    """The user whose request is being served (inside a method handler)."""
    return _caller.get()


def may_operate(user: User | None) -> bool:
    """Operators, and the server itself (internal session), may trigger and write inputs."""
    if user is None:
        return False
    if user.role == UserRole.Admin:
        return True
    return isinstance(user, ApplianceUser) and user.access == OPERATOR


TrustCheck = Callable[[x509.Certificate, ua.ApplicationDescription], None]
"""Raises a ServiceError unless the certificate may connect for the application (Pki.check)."""
SessionAudit = Callable[[str, str, str, dict[str, Any]], None]
"""Records (user, action, peer, detail): ``opcua.session`` or ``opcua.session.refused``."""


def _token_user(token: Any) -> str:
    """The user name an ActivateSession asks for (for the audit of a refusal)."""
    if isinstance(token, ua.UserNameIdentityToken):
        return loggable(token.UserName or "")
    return "anonymous"


class SecureSession(InternalSession):
    """A session bound to its secure channel's trusted certificate; tells handlers who calls."""

    iserver: SecureInternalServer
    client_certificate = b""
    """The ClientCertificate of CreateSession, which must be the channel's."""
    client_description: ua.ApplicationDescription | None = None

    async def create_session(self, params: ua.CreateSessionParameters,
                             sockname: tuple[str, int] | None = None) -> ua.CreateSessionResult:
        self.client_certificate = params.ClientCertificate or b""
        self.client_description = params.ClientDescription
        return await super().create_session(params, sockname)

    def activate_session(self, params: ua.ActivateSessionParameters,
                         peer_certificate: bytes | None) -> ua.ActivateSessionResult:
        channel = current_channel()
        if channel is None:  # only a GuardedProtocol tells which channel this is (tests/unit canary)
            log.error("OPC UA session refused: activation outside the appliance's transport")
            raise ServiceError(ua.StatusCodes.BadInternalError)
        on = {"policy": channel.policy_uri, "mode": channel.mode}
        try:
            self._check_channel(peer_certificate or b"", channel.peer)
            result = super().activate_session(params, peer_certificate)
        except (ServiceError, ua.UaStatusCodeError) as exc:
            if exc.code != ua.StatusCodes.BadUserAccessDenied:  # a wrong password: the login guard audits it
                self.iserver.audit(_token_user(params.UserIdentityToken), "opcua.session.refused", channel.peer,
                                   {"status": ua.StatusCode(ua.UInt32(exc.code)).name, **on})
            raise
        self.iserver.audit(self.user.name or "", "opcua.session", channel.peer,
                           {**on, "access": getattr(self.user, "access", None),
                            "application": loggable((self.client_description or ua.ApplicationDescription())
                                                    .ApplicationUri or "")})
        return result

    def _check_channel(self, certificate: bytes, peer: str) -> None:
        """The channel's certificate is trusted and is the one CreateSession sent; or a None channel
        where commissioning allows it."""
        host = peer.rsplit(":", 1)[0]
        if not certificate:  # every Sign/SignAndEncrypt channel carries the client's certificate
            if self.iserver.allow_unsecured_sessions:
                return
            self.iserver.refusals.event(host, "OPC UA session from %s refused: the client did not secure its "
                                             "channel (only SignAndEncrypt endpoints are offered)", peer)
            raise ServiceError(ua.StatusCodes.BadSecurityModeRejected)
        self.iserver.trust(x509.load_der_x509_certificate(certificate),
                           self.client_description or ua.ApplicationDescription())  # logs once per certificate
        if self.client_certificate != certificate:
            self.iserver.refusals.event(
                host, "OPC UA session from %s refused: %s (BadSecurityChecksFailed)", peer,
                "its CreateSession carried no client certificate" if not self.client_certificate else
                "the certificate in its CreateSession is not the one that secured its channel")
            raise ServiceError(ua.StatusCodes.BadSecurityChecksFailed)

    async def call(self, params: list[ua.CallMethodRequest]) -> list[ua.CallMethodResult]:
        token = _caller.set(self.user)
        try:
            return await super().call(params)
        finally:
            _caller.reset(token)


class SecureInternalServer(InternalServer):
    """asyncua's internal server, with :class:`SecureSession` for every client session.

    ``trust`` checks a channel's certificate (the PKI's trust list); ``audit`` records sessions
    activated and refused.
    """

    allow_unsecured_sessions = False

    def __init__(self, user_manager: UserManager, trust: TrustCheck, audit: SessionAudit) -> None:
        super().__init__(user_manager)
        self.trust, self.audit = trust, audit
        self.refusals = PerHost(log, quiet_s=QUIET_S)

    def decrypt_user_token(self, isession: Any, token: ua.UserNameIdentityToken) -> tuple[str, str]:
        """asyncua 2.1.0 calls this with the session just before ``user_manager.get_user``, which is
        not told the client: the session's name is the client's (host, port), kept for get_user."""
        peer = getattr(isession, "name", None)
        _login_peer.set(str(peer[0]) if isinstance(peer, tuple) and peer else None)
        return super().decrypt_user_token(isession, token)

    def create_session(self, name: str, user: User = User(role=UserRole.Anonymous),  # noqa: B008
                       external: bool = False) -> InternalSession:
        return SecureSession(self, self.aspace, self.subscription_service, name, user=user,
                             external=external)
