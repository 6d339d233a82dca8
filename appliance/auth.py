"""Users, roles and API tokens.

Roles are ordered: ``operator`` (review and label parts) < ``engineer`` (+ retrain, promote,
roll back) < ``admin`` (+ users and settings).  Users live in ``<state>/users.json`` with argon2
hashes (never plain passwords, never in the YAML or git), written 0600.  The API hands out
short-lived signed bearer tokens (HS256 JWT); the signing key is created on first start in
``<state>/api-secret`` (0600), so restarting the daemon keeps tokens valid until they expire.

Each token carries the user's password stamp (derived from the stored hash, which gets a new
salt with every password set), so setting a user's password revokes all of that user's tokens;
so does removing the user.  The last admin can be neither removed nor demoted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from appliance.errors import UserError

Role = Literal["operator", "engineer", "admin"]
ROLES: tuple[Role, ...] = ("operator", "engineer", "admin")
NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_PASSWORD = 10
TOKEN_TTL = timedelta(hours=12)


def role_at_least(role: str, required: Role) -> bool:
    return role in ROLES and ROLES.index(role) >= ROLES.index(required)


@dataclass(frozen=True, slots=True)
class Identity:
    name: str
    role: Role
    stamp: str = ""
    """The password stamp when the token was issued (see :func:`password_stamp`)."""


class LastAdmin(UserError):
    """The change would leave no admin to manage users."""


def password_stamp(stored_hash: str) -> str:
    """Changes whenever the password is set (the argon2 hash has a fresh salt each time)."""
    return hashlib.sha256(stored_hash.encode()).hexdigest()[:16]


def write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class UserStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._hasher = PasswordHasher()
        self._lock = threading.Lock()
        self._cache: tuple[tuple[int, int, int], dict[str, dict[str, str]]] | None = None

    def _load(self) -> dict[str, dict[str, str]]:
        """The users (re-read when the file changed: the CLI writes it from another process)."""
        try:
            st = os.stat(self.path)
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            if self._cache is not None and self._cache[0] == key:
                return dict(self._cache[1])
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise UserError(f"{self.path}: unreadable user file ({exc})") from exc
        users: dict[str, dict[str, str]] = data.get("users", {})
        self._cache = (key, users)
        return dict(users)

    def _save(self, users: dict[str, dict[str, str]]) -> None:
        write_private(self.path, json.dumps({"users": users}, indent=2).encode())

    def list(self) -> list[Identity]:
        return [self._identity(name, u) for name, u in sorted(self._load().items())]

    def identity(self, name: str) -> Identity | None:
        """The user as now stored (role and password stamp), or None."""
        user = self._load().get(name)
        return None if user is None else self._identity(name, user)

    @staticmethod
    def _identity(name: str, user: dict[str, str]) -> Identity:
        return Identity(name, user["role"], password_stamp(user["hash"]))  # type: ignore[arg-type]

    @staticmethod
    def _keep_an_admin(users: dict[str, dict[str, str]], name: str, change: str) -> None:
        admins = [n for n, u in users.items() if u["role"] == "admin"]
        if admins == [name]:
            raise LastAdmin(f"'{name}' is the last admin and cannot be {change}: make another user admin first")

    def set(self, name: str, role: str, password: str) -> None:
        """Create a user or replace its role and password."""
        if not NAME.match(name):
            raise UserError(f"user name '{name}': use 1-64 letters, digits, '_', '.', '@' or '-'")
        if role not in ROLES:
            raise UserError(f"role '{role}': expected one of {', '.join(ROLES)}")
        if len(password) < MIN_PASSWORD:
            raise UserError(f"password for '{name}' is shorter than {MIN_PASSWORD} characters")
        with self._lock:
            users = self._load()
            if role != "admin":
                self._keep_an_admin(users, name, f"made {role}")
            users[name] = {"role": role, "hash": self._hasher.hash(password)}
            self._save(users)

    def remove(self, name: str) -> None:
        with self._lock:
            users = self._load()
            if name not in users:
                raise UserError(f"no user '{name}'")
            self._keep_an_admin(users, name, "removed")
            del users[name]
            self._save(users)

    def verify(self, name: str, password: str) -> Identity | None:
        user = self._load().get(name)
        if user is None:
            self._hasher.hash(password)  # same cost whether or not the user exists
            return None
        try:
            self._hasher.verify(user["hash"], password)
        except (VerificationError, InvalidHashError):
            return None
        return self._identity(name, user)


class TokenIssuer:
    def __init__(self, secret_path: Path, ttl: timedelta = TOKEN_TTL) -> None:
        self.ttl = ttl
        try:
            self._key = secret_path.read_bytes()
        except FileNotFoundError:
            self._key = secrets.token_bytes(32)
            write_private(secret_path, self._key)

    def issue(self, who: Identity) -> tuple[str, datetime]:
        expires = datetime.now(UTC) + self.ttl
        token = jwt.encode({"sub": who.name, "role": who.role, "pv": who.stamp, "exp": expires}, self._key,
                           algorithm="HS256")
        return token, expires

    def check(self, token: str) -> Identity | None:
        try:
            claims = jwt.decode(token, self._key, algorithms=["HS256"], options={"require": ["exp", "sub"]})
        except jwt.PyJWTError:
            return None
        if claims.get("role") not in ROLES:
            return None
        return Identity(claims["sub"], claims["role"], str(claims.get("pv", "")))
