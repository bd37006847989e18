"""Client users for the SOCKS5 (RFC 1929) and HTTP CONNECT (Basic) listeners.

A ``users_file`` holds one ``name:hash`` per line; blank lines and ``#`` comments are
skipped. Hashes are never made here at login time, only checked, and only two formats
are accepted, both written by common tools so operators need not use ours:

- ``$scrypt$ln=<log2 N>,r=<r>,p=<p>$<salt>$<hash>`` (passlib's scrypt format), and
- ``$argon2id$v=19$m=<KiB>,t=<iterations>,p=<lanes>$<salt>$<hash>`` (the PHC string the
  ``argon2`` CLI and argon2-cffi write),

salt and hash in standard base64 without padding. Every cost parameter is bounded, so a
hostile or mistyped file cannot make one login take minutes or gigabytes.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import os
import re
import stat
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias

import trio
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from gateway.errors import TunnelgateError

Scheme: TypeAlias = Literal["scrypt", "argon2id"]

# RFC 1929 carries the user name in a length byte; HTTP Basic cannot carry a ':' in it.
NAME_MAX_BYTES = 255

SALT_MIN_BYTES = 8
HASH_BYTES = (16, 64)
# scrypt: 128 * N * r bytes of memory, time proportional to N * r * p. The default
# (ln=15, r=8, p=1) is 32 MiB and 2**18 work; the ceilings allow 1 GiB and 64 times the
# work (a few seconds), where the single-parameter bounds alone would allow 4 GiB and
# most of a minute.
SCRYPT_LN = (10, 20)
SCRYPT_R = (1, 32)
SCRYPT_P = (1, 16)
SCRYPT_MAX_MEMORY = 1 << 30
SCRYPT_MAX_WORK = 1 << 24
# Argon2id: m in KiB (1 GiB at most), t passes over it, p lanes (m >= 8 * p by the spec).
ARGON2_M = (8, 1 << 20)
ARGON2_T = (1, 10)
ARGON2_P = (1, 16)
ARGON2_VERSION = 19

# What hash_password writes: scrypt as recommended since 2009 for interactive logins
# (32 MiB), Argon2id as RFC 9106's second recommendation (64 MiB, for hosts that cannot
# spare the first one's 2 GiB per login).
DEFAULT_SCRYPT = (15, 8, 1)  # ln, r, p
DEFAULT_ARGON2 = (65536, 3, 4)  # m, t, p
DEFAULT_SALT_BYTES = 16
DEFAULT_HASH_BYTES = 32

CACHE_SIZE = 1024
# KDF threads at once, for the whole process: a flood of logins queues instead of taking
# every worker thread (and every core) from the relays.
KDF_THREADS = 2

_B64 = r"[A-Za-z0-9+/]+"
_N = r"[0-9]{1,10}"
_SCRYPT_RE = re.compile(rf"\$scrypt\$ln=({_N}),r=({_N}),p=({_N})\$({_B64})\$({_B64})")
_ARGON2_RE = re.compile(rf"\$argon2id\$v=({_N})\$m=({_N}),t=({_N}),p=({_N})\$({_B64})\$({_B64})")
_SCRYPT_FORMAT = "$scrypt$ln=<log2 N>,r=<r>,p=<p>$<salt>$<hash>"
_ARGON2_FORMAT = "$argon2id$v=19$m=<KiB>,t=<iterations>,p=<lanes>$<salt>$<hash>"
_CUT = 20


class UsersFileError(TunnelgateError, ValueError):
    """A users_file is unreadable or wrong; ``str()`` is ``FILE:LINE: message``, one line.

    Messages quote at most ~20 characters of the offending text, and never a hash's salt
    or digest or what follows a name, which may be a password typed in by mistake.
    """

    def __init__(self, file: str, line: int, message: str) -> None:
        self.file = file
        self.line = line
        self.message = message
        super().__init__(file, line, message)

    def __str__(self) -> str:
        if self.line:
            return f"{self.file}:{self.line}: {self.message}"
        return f"{self.file}: {self.message}"


@dataclass(frozen=True)
class _ScryptHash:
    ln: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    def derive(self, password: bytes) -> bytes:
        kdf = Scrypt(salt=self.salt, length=len(self.digest), n=1 << self.ln, r=self.r, p=self.p)
        return kdf.derive(password)

    def encode(self) -> str:
        return f"$scrypt$ln={self.ln},r={self.r},p={self.p}${_b64(self.salt)}${_b64(self.digest)}"


@dataclass(frozen=True)
class _Argon2Hash:
    m: int
    t: int
    p: int
    salt: bytes
    digest: bytes

    def derive(self, password: bytes) -> bytes:
        kdf = Argon2id(
            salt=self.salt, length=len(self.digest), iterations=self.t, lanes=self.p, memory_cost=self.m
        )
        return kdf.derive(password)

    def encode(self) -> str:
        params = f"v={ARGON2_VERSION}$m={self.m},t={self.t},p={self.p}"
        return f"$argon2id${params}${_b64(self.salt)}${_b64(self.digest)}"


_Hash: TypeAlias = _ScryptHash | _Argon2Hash


def _derive(entry: _Hash, password: bytes) -> bytes:
    """The one place a KDF runs (tests count calls here)."""
    return entry.derive(password)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    if len(text) % 4 == 1:
        raise ValueError("not base64")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _cut(text: str) -> str:
    """Quote text for an error message, at most ~20 characters of it."""
    return repr(text if len(text) <= _CUT else text[:_CUT] + "...")


def is_valid_name(name: str) -> bool:
    """1..255 bytes of UTF-8 without ':' or whitespace: what SOCKS5 and HTTP Basic can carry."""
    return (
        0 < len(name.encode("utf-8", "surrogatepass")) <= NAME_MAX_BYTES
        and ":" not in name
        and not any(char.isspace() for char in name)
    )


def _check_bounds(scheme: str, who: str, params: tuple[tuple[str, int, tuple[int, int]], ...]) -> None:
    for key, value, (low, high) in params:
        if not low <= value <= high:
            raise ValueError(f"{scheme} {key}={value} {who} is out of range: expected {low}..{high}")


def _parse_hash(name: str, encoded: str) -> _Hash:
    """One hash string to its parameters; ValueError with a message that quotes no secret."""
    who = f"for {_cut(name)}"
    if not encoded.startswith("$"):
        # Likely a password written where its hash belongs: say so without echoing it.
        raise ValueError(
            f"expected a $scrypt$ or $argon2id$ hash {who}, got text that is not one"
            " (make one with 'tunnelgate passwd')"
        )
    if encoded.startswith("$scrypt$"):
        scheme, match, shape = "scrypt", _SCRYPT_RE.fullmatch(encoded), _SCRYPT_FORMAT
    elif encoded.startswith("$argon2id$"):
        scheme, match, shape = "argon2id", _ARGON2_RE.fullmatch(encoded), _ARGON2_FORMAT
    else:
        ident = encoded[: encoded.find("$", 1) + 1] or encoded
        raise ValueError(f"expected a $scrypt$ or $argon2id$ hash {who}, got {_cut(ident)}")
    if match is None:
        raise ValueError(f"expected {shape} (base64 without padding) {who}, got {_cut(encoded)}")
    *numbers, salt_text, digest_text = match.groups()
    try:
        salt, digest = _unb64(salt_text), _unb64(digest_text)
    except (ValueError, binascii.Error):
        raise ValueError(f"{scheme} salt or hash {who} is not base64 without padding") from None
    if len(salt) < SALT_MIN_BYTES:
        raise ValueError(f"{scheme} salt {who} is {len(salt)} bytes: expected at least {SALT_MIN_BYTES}")
    low, high = HASH_BYTES
    if not low <= len(digest) <= high:
        raise ValueError(f"{scheme} hash {who} is {len(digest)} bytes: expected {low}..{high}")
    values = [int(number) for number in numbers]
    if scheme == "scrypt":
        ln, r, p = values
        _check_bounds(scheme, who, (("ln", ln, SCRYPT_LN), ("r", r, SCRYPT_R), ("p", p, SCRYPT_P)))
        if 128 * r << ln > SCRYPT_MAX_MEMORY:
            raise ValueError(
                f"scrypt ln={ln},r={r} {who} needs {(128 * r << ln) >> 20} MiB:"
                f" expected at most {SCRYPT_MAX_MEMORY >> 20} (128 * 2**ln * r bytes)"
            )
        if (r * p) << ln > SCRYPT_MAX_WORK:
            raise ValueError(
                f"scrypt ln={ln},r={r},p={p} {who} is too slow to check:"
                f" expected 2**ln * r * p <= 2**{SCRYPT_MAX_WORK.bit_length() - 1}"
            )
        return _ScryptHash(ln, r, p, salt, digest)
    version, m, t, p = values
    if version != ARGON2_VERSION:
        raise ValueError(f"argon2id v={version} {who} is not supported: expected v={ARGON2_VERSION}")
    _check_bounds(scheme, who, (("m", m, ARGON2_M), ("t", t, ARGON2_T), ("p", p, ARGON2_P)))
    if m < 8 * p:
        raise ValueError(f"argon2id m={m},p={p} {who}: expected m >= 8 * p")
    return _Argon2Hash(m, t, p, salt, digest)


def _password_bytes(password: str) -> bytes | None:
    """UTF-8; surrogateescape so bytes a listener decoded that way come back unchanged."""
    try:
        return password.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return None


_KDF_LIMITER: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("tunnelgate_kdf_limiter")


def _limiter() -> trio.CapacityLimiter:
    """One limiter per trio run, shared by every database (old and new across a reload)."""
    try:
        return _KDF_LIMITER.get()
    except LookupError:
        limiter = trio.CapacityLimiter(KDF_THREADS)
        _KDF_LIMITER.set(limiter)
        return limiter


class UserDatabase:
    """Names and password hashes, checked in constant time per name.

    Immutable: a reloaded users_file is a new database (with an empty cache), so a
    changed or removed password stops working at once.
    """

    def __init__(
        self, hashes: Mapping[str, str], *, path: Path | None = None, insecure_mode: bool = False
    ) -> None:
        """``hashes`` maps names to encoded hashes; ValueError names the first bad one."""
        self._hashes: dict[str, _Hash] = {}
        for name, encoded in hashes.items():
            if not is_valid_name(name):
                raise ValueError(f"expected a user name of 1..{NAME_MAX_BYTES} bytes"
                                 f" without ':' or whitespace, got {_cut(name)}")
            self._hashes[name] = _parse_hash(name, encoded)
        self.path = path
        # True when the file is readable or writable by group or others (mode & 0o077):
        # offline guessing needs only the hashes, so callers should warn.
        self.insecure_mode = insecure_mode
        # For unknown names: the same work as the first user's check, against random bytes,
        # so response times do not tell which names exist.
        first = next(iter(self._hashes.values()), None)
        self._dummy = None if first is None else dataclasses.replace(
            first, salt=os.urandom(len(first.salt)), digest=os.urandom(len(first.digest))
        )
        self._cache: OrderedDict[bytes, None] = OrderedDict()
        self._cache_key = os.urandom(32)

    def __len__(self) -> int:
        return len(self._hashes)

    @property
    def names(self) -> tuple[str, ...]:
        """The user names, in file order."""
        return tuple(self._hashes)

    def verify(self, name: str, password: str) -> bool:
        """True if ``password`` is ``name``'s; blocks for one KDF run (~0.1 s by default).

        An unknown name (or a password that cannot be encoded) costs the same KDF run as
        a known one, and digests are compared with ``hmac.compare_digest``.
        """
        entry = self._hashes.get(name)
        secret = _password_bytes(password)
        if entry is None or secret is None:
            decoy = entry or self._dummy
            if decoy is not None:
                _derive(decoy, secret or b"")
            return False
        return hmac.compare_digest(_derive(entry, secret), entry.digest)

    async def check(self, name: str, password: str) -> bool:
        """``verify`` in a worker thread, with recent successes remembered.

        Why a cache: scrypt at ln=15 costs ~50-100 ms of CPU, and a client (a browser
        behind SOCKS5) may open dozens of sessions with the same credentials at once; with
        the cache it pays the KDF once, not per session. Only successes are cached (a
        wrong guess always pays the KDF), at most CACHE_SIZE of them, least recently used
        evicted first. Entries are HMACs under a random per-process key, never the
        password or a plain digest of it. At most KDF_THREADS checks run at once in the
        whole process; the others wait, and re-check the cache when their turn comes, so
        a burst of identical logins costs at most KDF_THREADS runs.
        """
        key = self._key(name, password)
        if self._hit(key):
            return True
        async with _limiter():
            if self._hit(key):
                return True
            ok = await trio.to_thread.run_sync(self.verify, name, password)
            if ok:  # before the limiter goes to the next waiter, which may be the same login
                self._cache[key] = None
                if len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        return ok

    def _key(self, name: str, password: str) -> bytes:
        name_bytes = name.encode("utf-8", "surrogatepass")
        password_digest = hashlib.sha256(password.encode("utf-8", "surrogatepass")).digest()
        message = len(name_bytes).to_bytes(4, "big") + name_bytes + password_digest
        return hmac.new(self._cache_key, message, hashlib.sha256).digest()

    def _hit(self, key: bytes) -> bool:
        if key in self._cache:
            self._cache.move_to_end(key)
            return True
        return False


def load_users(path: Path) -> UserDatabase:
    """Read a users_file; UsersFileError says which line is wrong and how.

    Checks every line before returning, so a reload with a broken file changes nothing.
    """
    file = str(path)
    try:
        with open(path, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            data = handle.read()
    except OSError as exc:
        raise UsersFileError(file, 0, f"cannot read: {exc.strerror or exc}") from None
    hashes: dict[str, str] = {}
    lines: dict[str, int] = {}
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UsersFileError(file, number, "expected UTF-8 text") from None
        line = text.removeprefix("\ufeff").strip() if number == 1 else text.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, encoded = line.partition(":")
        if not colon:
            raise UsersFileError(
                file, number, f"expected name:hash with a $scrypt$ or $argon2id$ hash, got {_cut(line)}"
            )
        if not is_valid_name(name):
            raise UsersFileError(
                file, number,
                f"expected a user name of 1..{NAME_MAX_BYTES} bytes without ':' or whitespace,"
                f" got {_cut(name)}",
            )
        if name in lines:
            raise UsersFileError(file, number, f"user {_cut(name)} is already defined on line {lines[name]}")
        try:
            _parse_hash(name, encoded)
        except ValueError as exc:
            raise UsersFileError(file, number, str(exc)) from None
        hashes[name] = encoded
        lines[name] = number
    return UserDatabase(hashes, path=path, insecure_mode=bool(stat.S_IMODE(mode) & 0o077))


def hash_password(password: str, scheme: Scheme = "scrypt") -> str:
    """A new hash for a users_file line, with the recommended parameters and a random salt.

    scrypt: ln=15, r=8, p=1 (32 MiB); argon2id: m=65536 (64 MiB), t=3, p=4 (RFC 9106's
    second recommendation); 16-byte salt, 32-byte hash.
    """
    salt = os.urandom(DEFAULT_SALT_BYTES)
    secret = password.encode("utf-8", "surrogateescape")
    entry: _Hash
    if scheme == "scrypt":
        entry = _ScryptHash(*DEFAULT_SCRYPT, salt=salt, digest=bytes(DEFAULT_HASH_BYTES))
    elif scheme == "argon2id":
        entry = _Argon2Hash(*DEFAULT_ARGON2, salt=salt, digest=bytes(DEFAULT_HASH_BYTES))
    else:
        raise ValueError(f"expected scheme 'scrypt' or 'argon2id', got {scheme!r}")
    return dataclasses.replace(entry, digest=_derive(entry, secret)).encode()
