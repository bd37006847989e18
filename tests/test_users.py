"""users_file parsing, password checks against independent implementations, the login
cache and the ``tunnelgate passwd`` command."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio

from gateway.errors import TunnelgateError
from gateway.security import users
from gateway.security.users import (
    UserDatabase,
    UsersFileError,
    hash_password,
    is_valid_name,
    load_users,
)

ROOT = Path(__file__).resolve().parent.parent

# Made with argon2-cffi 25.1.0 (an independent implementation: the reference C code):
#   pip install --target /tmp/a2 argon2-cffi
#   PYTHONPATH=/tmp/a2 python -c "from argon2 import PasswordHasher as H;
#       print(H(time_cost=2, memory_cost=256, parallelism=2).hash('correct horse battery staple'));
#       print(H().hash('Tr0ub4dor&3'))"
# The second uses argon2-cffi's defaults, RFC 9106's second recommendation like ours.
ARGON2_CFFI_SMALL = (
    "correct horse battery staple",
    "$argon2id$v=19$m=256,t=2,p=2$bBP/Ubp91nZl6jRZ6PTjRg$pDuUUK1nMTGqcS7SUtctnVcEcqdjLJNpDDWiHEQcIHE",
)
ARGON2_CFFI_DEFAULT = (
    "Tr0ub4dor&3",
    "$argon2id$v=19$m=65536,t=3,p=4$yvaA+cs0zUoLfobtLBRR+Q$5wIOzS0kjTE9nj+OsKz1w61nkgII2lmX8/9azz0KQNk",
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def scrypt_line(name: str, password: str, ln: int = 10, r: int = 8, p: int = 1, salt: bytes = b"") -> str:
    """A users_file line computed with hashlib (OpenSSL's scrypt, not cryptography's wrapper)."""
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=1 << ln, r=r, p=p, dklen=32)
    return f"{name}:$scrypt$ln={ln},r={r},p={p}${b64(salt)}${b64(digest)}"


def write(directory: Path, *lines: str, mode: int = 0o600) -> Path:
    path = directory / "users.txt"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    path.chmod(mode)
    return path


def load_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *lines: str) -> str:
    """The message load_users gives for these lines, with the file named as 'users.txt'."""
    write(tmp_path, *lines)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsersFileError) as caught:
        load_users(Path("users.txt"))
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.fixture
def kdf_calls(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every KDF run, by the hash entry it ran for."""
    calls: list[object] = []
    real = users._derive

    def counting(entry: users._Hash, password: bytes) -> bytes:
        calls.append(entry)
        return real(entry, password)

    monkeypatch.setattr(users, "_derive", counting)
    return calls


# Round trips and independent implementations


def test_default_scrypt_round_trip_with_the_recommended_parameters(tmp_path: Path) -> None:
    encoded = hash_password("pässword")
    prefix, salt, digest = encoded.rsplit("$", 2)
    assert prefix == "$scrypt$ln=15,r=8,p=1"
    assert (len(base64.b64decode(salt + "==")), len(base64.b64decode(digest + "=="))) == (16, 32)
    assert "=" not in salt + digest
    assert hash_password("pässword") != encoded  # a fresh salt each time
    # Decodable by hashlib too: the format is what it says.
    salt_raw, digest_bytes = base64.b64decode(salt + "=="), base64.b64decode(digest + "==")
    again = hashlib.scrypt("pässword".encode(), salt=salt_raw, n=1 << 15, r=8, p=1, maxmem=1 << 26, dklen=32)
    assert again == digest_bytes
    db = load_users(write(tmp_path, f"alice:{encoded}"))
    assert db.verify("alice", "pässword")
    assert not db.verify("alice", "password")


def test_default_argon2id_round_trip_with_the_recommended_parameters(tmp_path: Path) -> None:
    encoded = hash_password("s3cret", "argon2id")
    assert encoded.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    salt, digest = encoded.split("$")[-2:]
    assert (len(base64.b64decode(salt + "==")), len(base64.b64decode(digest + "=="))) == (16, 32)
    db = load_users(write(tmp_path, f"bob:{encoded}"))
    assert db.verify("bob", "s3cret")
    assert not db.verify("bob", "s3cret ")


def test_scrypt_line_made_by_hashlib_verifies(tmp_path: Path) -> None:
    db = load_users(write(tmp_path, scrypt_line("carol", "open sesame", ln=10, r=4, p=2)))
    assert db.verify("carol", "open sesame")
    assert not db.verify("carol", "open sesame!")
    assert not db.verify("Carol", "open sesame")  # names are case-sensitive


@pytest.mark.parametrize("vector", [ARGON2_CFFI_SMALL, ARGON2_CFFI_DEFAULT], ids=["small", "default"])
def test_argon2id_line_made_by_argon2_cffi_verifies(tmp_path: Path, vector: tuple[str, str]) -> None:
    password, encoded = vector
    db = load_users(write(tmp_path, f"dave:{encoded}"))
    assert db.verify("dave", password)
    assert not db.verify("dave", password.upper())


# Wrong passwords and unknown names


def test_unknown_name_costs_one_kdf_run_with_the_first_users_parameters(
    tmp_path: Path, kdf_calls: list[object]
) -> None:
    db = load_users(write(tmp_path, f"eve:{ARGON2_CFFI_SMALL[1]}", scrypt_line("frank", "x")))
    assert not db.verify("mallory", "x")
    assert not db.verify("", "")
    assert len(kdf_calls) == 2
    decoy = kdf_calls[0]
    assert isinstance(decoy, users._Argon2Hash)
    assert (decoy.m, decoy.t, decoy.p) == (256, 2, 2)
    # The wrong password of a known user costs the same single run.
    assert not db.verify("eve", "x")
    assert len(kdf_calls) == 3


def test_a_password_that_cannot_be_encoded_is_refused_after_a_kdf_run(
    tmp_path: Path, kdf_calls: list[object]
) -> None:
    db = load_users(write(tmp_path, scrypt_line("gina", "x")))
    assert not db.verify("gina", "\ud800")
    assert len(kdf_calls) == 1


def test_an_empty_database_refuses_everyone(tmp_path: Path) -> None:
    db = load_users(write(tmp_path, "# nobody yet"))
    assert (len(db), db.names) == (0, ())
    assert not db.verify("alice", "x")


# The file format


def test_comments_blank_lines_bom_crlf_and_surrounding_blanks_are_ignored(tmp_path: Path) -> None:
    alice, bob = scrypt_line("alice", "a"), scrypt_line("bob", "b")
    path = tmp_path / "users.txt"
    text = f"\ufeff# users\r\n\r\n   \n  # indented comment\n{alice}\r\n\t{bob}  \n#bob:$scrypt$nope\n"
    path.write_bytes(text.encode("utf-8"))
    db = load_users(path)
    assert (len(db), db.names) == (2, ("alice", "bob"))
    assert db.verify("alice", "a") and db.verify("bob", "b")


def test_insecure_mode_reports_group_or_other_access(tmp_path: Path) -> None:
    path = write(tmp_path, scrypt_line("alice", "a"), mode=0o600)
    assert not load_users(path).insecure_mode
    path.chmod(0o640)
    assert load_users(path).insecure_mode
    path.chmod(0o604)
    assert load_users(path).insecure_mode


def test_error_is_a_value_error_and_ours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsersFileError) as caught:
        load_users(Path("missing.txt"))
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, TunnelgateError)
    assert str(caught.value) == "missing.txt: cannot read: No such file or directory"
    assert (caught.value.file, caught.value.line) == ("missing.txt", 0)


def test_the_brief_example_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    message = load_error(tmp_path, monkeypatch, "# users", "", "bob")
    assert message == "users.txt:3: expected name:hash with a $scrypt$ or $argon2id$ hash, got 'bob'"


SALT = b64(b"s" * 16)
DIGEST = b64(b"d" * 32)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("x" * 40, "expected name:hash with a $scrypt$ or $argon2id$ hash, got 'xxxxxxxxxxxxxxxxxxxx...'"),
        (f":$scrypt$ln=10,r=8,p=1${SALT}${DIGEST}", "expected a user name of 1..255 bytes without ':' or"
         " whitespace, got ''"),
        (f"bob smith:$scrypt$ln=10,r=8,p=1${SALT}${DIGEST}", "got 'bob smith'"),
        ("é" * 128 + f":$scrypt$ln=10,r=8,p=1${SALT}${DIGEST}", "user name of 1..255 bytes"),
        ("alice:hunter2", "expected a $scrypt$ or $argon2id$ hash for 'alice', got text that is not one"
         " (make one with 'tunnelgate passwd')"),
        (f"alice:$2b$12${DIGEST}", "expected a $scrypt$ or $argon2id$ hash for 'alice', got '$2b$'"),
        (f"alice:$argon2i$v=19$m=256,t=2,p=2${SALT}${DIGEST}", "got '$argon2i$'"),
        (f"alice:$scrypt$ln=10,r=8${SALT}${DIGEST}",
         "expected $scrypt$ln=<log2 N>,r=<r>,p=<p>$<salt>$<hash> (base64 without padding) for 'alice',"
         " got '$scrypt$ln=10,r=8$c3...'"),
        (f"alice:$scrypt$ln=10,r=8,p=1${SALT}==${DIGEST}", "(base64 without padding)"),
        (f"alice:$argon2id$m=256,t=2,p=2${SALT}${DIGEST}",
         "expected $argon2id$v=19$m=<KiB>,t=<iterations>,p=<lanes>$<salt>$<hash>"),
        (f"alice:$scrypt$ln=10,r=8,p=1${SALT}$A",
         "scrypt salt or hash for 'alice' is not base64 without padding"),
    ],
)
def test_malformed_lines_name_their_line_and_what_was_expected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str, expected: str
) -> None:
    good = scrypt_line("zed", "z")
    message = load_error(tmp_path, monkeypatch, "# header", good, "", line, good.replace("zed", "zoe"))
    assert message.startswith("users.txt:4: "), message
    assert expected in message
    assert "hunter2" not in message and DIGEST not in message and SALT not in message
    assert len(message) < 200


def test_a_line_that_is_not_utf8_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "users.txt").write_bytes(b"# ok\n\xff\xfe:x\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsersFileError, match=r"^users\.txt:2: expected UTF-8 text$"):
        load_users(Path("users.txt"))


def test_duplicate_names_name_both_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    alice = scrypt_line("alice", "a")
    message = load_error(tmp_path, monkeypatch, alice, scrypt_line("bob", "b"), "# again:", alice)
    assert message == "users.txt:4: user 'alice' is already defined on line 1"


def hash_line(prefix: str, salt: bytes = b"s" * 16, digest: bytes = b"d" * 32) -> str:
    return f"alice:{prefix}${b64(salt)}${b64(digest)}"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (hash_line("$scrypt$ln=9,r=8,p=1"), "scrypt ln=9 for 'alice' is out of range: expected 10..20"),
        (hash_line("$scrypt$ln=21,r=1,p=1"), "scrypt ln=21 for 'alice' is out of range: expected 10..20"),
        (hash_line("$scrypt$ln=10,r=0,p=1"), "scrypt r=0 for 'alice' is out of range: expected 1..32"),
        (hash_line("$scrypt$ln=10,r=33,p=1"), "scrypt r=33 for 'alice' is out of range: expected 1..32"),
        (hash_line("$scrypt$ln=10,r=8,p=17"), "scrypt p=17 for 'alice' is out of range: expected 1..16"),
        (hash_line("$scrypt$ln=20,r=16,p=1"), "scrypt ln=20,r=16 for 'alice' needs 2048 MiB: expected at most"
         " 1024 (128 * 2**ln * r bytes)"),
        (hash_line("$scrypt$ln=18,r=8,p=16"), "scrypt ln=18,r=8,p=16 for 'alice' is too slow to check:"
         " expected 2**ln * r * p <= 2**24"),
        (hash_line("$scrypt$ln=99999999999,r=8,p=1"), "expected $scrypt$ln="),  # more digits than bounded
        (hash_line("$argon2id$v=16$m=256,t=2,p=2"),
         "argon2id v=16 for 'alice' is not supported: expected v=19"),
        (hash_line("$argon2id$v=19$m=1048577,t=1,p=1"),
         "argon2id m=1048577 for 'alice' is out of range: expected 8..1048576"),
        (hash_line("$argon2id$v=19$m=256,t=0,p=1"),
         "argon2id t=0 for 'alice' is out of range: expected 1..10"),
        (hash_line("$argon2id$v=19$m=256,t=11,p=1"),
         "argon2id t=11 for 'alice' is out of range: expected 1..10"),
        (hash_line("$argon2id$v=19$m=256,t=1,p=17"),
         "argon2id p=17 for 'alice' is out of range: expected 1..16"),
        (hash_line("$argon2id$v=19$m=16,t=1,p=4"), "argon2id m=16,p=4 for 'alice': expected m >= 8 * p"),
        (hash_line("$scrypt$ln=10,r=8,p=1", salt=b"s" * 7), "scrypt salt for 'alice' is 7 bytes:"
         " expected at least 8"),
        (hash_line("$argon2id$v=19$m=256,t=2,p=2", digest=b"d" * 15), "argon2id hash for 'alice' is 15 bytes:"
         " expected 16..64"),
        (hash_line("$scrypt$ln=10,r=8,p=1", digest=b"d" * 65), "scrypt hash for 'alice' is 65 bytes:"
         " expected 16..64"),
    ],
)
def test_parameters_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str, expected: str
) -> None:
    message = load_error(tmp_path, monkeypatch, "", line)
    assert message.startswith("users.txt:2: "), message
    assert expected in message, message


def test_the_largest_accepted_parameters_are_accepted(tmp_path: Path) -> None:
    db = load_users(write(
        tmp_path,
        hash_line("$scrypt$ln=20,r=8,p=2").replace("alice", "a1"),
        hash_line("$scrypt$ln=10,r=32,p=16", salt=b"s" * 8, digest=b"d" * 64).replace("alice", "a2"),
        hash_line("$argon2id$v=19$m=1048576,t=10,p=16").replace("alice", "a3"),
        hash_line("$argon2id$v=19$m=8,t=1,p=1", digest=b"d" * 16).replace("alice", "a4"),
    ))
    assert len(db) == 4


def test_names(tmp_path: Path) -> None:
    assert is_valid_name("alice") and is_valid_name("x" * 255) and is_valid_name("é" * 127)
    assert is_valid_name("user@example.com")
    for bad in ("", "x" * 256, "é" * 128, "a:b", "a b", "a\tb", "a\u00a0b"):
        assert not is_valid_name(bad), bad
    db = load_users(write(tmp_path, scrypt_line("x" * 255, "p")))
    assert db.verify("x" * 255, "p")


def test_database_from_a_mapping() -> None:
    db = UserDatabase({"bob": ARGON2_CFFI_SMALL[1]})
    assert (len(db), db.names, db.path, db.insecure_mode) == (1, ("bob",), None, False)
    with pytest.raises(ValueError, match="got 'a b'"):
        UserDatabase({"a b": ARGON2_CFFI_SMALL[1]})
    with pytest.raises(ValueError, match="scrypt ln=9"):
        UserDatabase({"bob": hash_line("$scrypt$ln=9,r=8,p=1").split(":", 1)[1]})


# check(): threads and the cache


async def test_check_caches_successes_only(tmp_path: Path, kdf_calls: list[object]) -> None:
    path = write(tmp_path, scrypt_line("alice", "right"), scrypt_line("bob", "b"))
    db = load_users(path)
    assert await db.check("alice", "right")
    assert await db.check("alice", "right")
    assert len(kdf_calls) == 1
    # A wrong password is never answered from the cache, and never cached.
    assert not await db.check("alice", "wrong")
    assert not await db.check("alice", "wrong")
    assert len(kdf_calls) == 3
    # Nor is the right password for another name, nor an unknown name.
    assert not await db.check("bob", "right")
    assert not await db.check("nobody", "right")
    assert not await db.check("nobody", "right")
    assert len(kdf_calls) == 6
    assert await db.check("alice", "right")
    assert len(kdf_calls) == 6
    # A new database (a reload) starts with an empty cache.
    again = load_users(path)
    assert await again.check("alice", "right")
    assert len(kdf_calls) == 7


async def test_cache_is_bounded_lru(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kdf_calls: list[object]
) -> None:
    monkeypatch.setattr(users, "CACHE_SIZE", 2)
    db = load_users(write(tmp_path, *(scrypt_line(name, name) for name in "abc")))
    for name in "ab":
        assert await db.check(name, name)
    assert await db.check("a", "a")  # a is now the most recent; b goes next
    assert await db.check("c", "c")
    assert len(kdf_calls) == 3
    assert await db.check("a", "a")
    assert len(kdf_calls) == 3
    assert await db.check("b", "b")
    assert len(kdf_calls) == 4


async def test_at_most_two_kdf_threads_and_a_burst_of_one_login_costs_at_most_two_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = peak = 0
    calls: list[bytes] = []
    lock = threading.Lock()
    real = users._derive

    def slow(entry: users._Hash, password: bytes) -> bytes:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            calls.append(password)
        time.sleep(0.05)
        with lock:
            running -= 1
        return real(entry, password)

    monkeypatch.setattr(users, "_derive", slow)
    db = load_users(write(tmp_path, *(scrypt_line(f"u{i}", f"p{i}") for i in range(6))))
    results: dict[str, bool] = {}

    async def login(name: str, password: str) -> None:
        results[name + password] = await db.check(name, password)

    async with trio.open_nursery() as nursery:
        for i in range(6):
            nursery.start_soon(login, f"u{i}", f"p{i}")
    assert peak == users.KDF_THREADS == 2
    assert all(results.values()) and len(results) == 6

    calls.clear()
    results.clear()
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(login, "u0", "p0")
    assert len(calls) == 0  # u0 was cached by the first burst
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(login, "new", "x")  # unknown: never cached, every one pays
    assert len(calls) == 10 and peak == 2


async def test_a_burst_of_the_same_new_login_runs_the_kdf_at_most_twice(
    tmp_path: Path, kdf_calls: list[object]
) -> None:
    db = load_users(write(tmp_path, scrypt_line("alice", "a")))
    outcomes: list[bool] = []

    async def login() -> None:
        outcomes.append(await db.check("alice", "a"))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(login)
    assert outcomes == [True] * 20
    assert 1 <= len(kdf_calls) <= users.KDF_THREADS


# tunnelgate passwd


def passwd(*args: str, stdin: str | bytes, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "passwd", *args],
        input=stdin.encode() if isinstance(stdin, str) else stdin,
        cwd=cwd,
        capture_output=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.parametrize("scheme", [[], ["--scheme", "argon2id"]], ids=["scrypt", "argon2id"])
def test_passwd_prints_a_line_that_load_users_verifies(tmp_path: Path, scheme: list[str]) -> None:
    done = passwd("alice", *scheme, stdin="correct horse\n", cwd=tmp_path)
    assert (done.returncode, done.stderr) == (0, b""), done.stderr
    line = done.stdout.decode()
    assert line.count("\n") == 1 and line.startswith("alice:$")
    assert line.startswith("alice:$argon2id$" if scheme else "alice:$scrypt$")
    db = load_users(write(tmp_path, "# made by tunnelgate passwd", line.rstrip("\n")))
    assert db.verify("alice", "correct horse")
    assert not db.verify("alice", "correct horse\n")


def test_passwd_strips_exactly_one_newline(tmp_path: Path) -> None:
    done = passwd("bob", stdin=" pass word \r\n", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    db = load_users(write(tmp_path, done.stdout.decode().strip()))
    assert db.verify("bob", " pass word ")


@pytest.mark.parametrize(
    ("name", "stdin", "expected"),
    [
        ("alice", "", "tunnelgate: refusing an empty password"),
        ("alice", "\n", "tunnelgate: refusing an empty password"),
        ("alice", "a\na\n", "tunnelgate: expected one line on stdin (the password, once)"),
        ("a:b", "x\n", "tunnelgate: 'a:b' is not a valid user name (1-255 bytes, no ':' or whitespace)"),
        ("a b", "x\n", "tunnelgate: 'a b' is not a valid user name (1-255 bytes, no ':' or whitespace)"),
        ("alice", b"\xff\n", "tunnelgate: the password on stdin is not UTF-8"),
    ],
)
def test_passwd_refusals_are_one_line_and_exit_2(
    tmp_path: Path, name: str, stdin: str | bytes, expected: str
) -> None:
    done = passwd(name, stdin=stdin, cwd=tmp_path)
    assert (done.returncode, done.stdout, done.stderr.decode()) == (2, b"", expected + "\n")
