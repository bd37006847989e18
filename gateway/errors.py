"""The project's one exception tree: catch ``TunnelgateError`` to catch ours, nothing else.

Each class is named by what went wrong, so callers can decide what to tell the user.
Other modules add their classes at the end of this file.
"""

from __future__ import annotations


class TunnelgateError(Exception):
    """Root of every error tunnelgate raises on purpose."""


class ConfigError(TunnelgateError):
    """A config file is wrong; ``str()`` names the file, the key and what was expected.

    The format ``FILE: KEY.PATH: message`` is what an operator greps for and what the
    CLI prints; ``key_path`` is empty for file-level problems (unreadable, bad TOML).
    """

    def __init__(self, file: str, key_path: str, message: str) -> None:
        self.file = file
        self.key_path = key_path
        self.message = message
        super().__init__(file, key_path, message)

    def __str__(self) -> str:
        if self.key_path:
            return f"{self.file}: {self.key_path}: {self.message}"
        return f"{self.file}: {self.message}"


class IdentityError(TunnelgateError):
    """A key or certificate is missing, unreadable, of the wrong kind, or mismatched."""


class CircuitBroken(TunnelgateError):
    """A circuit ended abnormally: reset by the far side, refused, or its carrier died.

    Circuits raise it wrapped as ``trio.BrokenResourceError`` (the stream contract);
    the original is in ``__cause__``. ``code`` is the wire ErrorCode (or int).
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        from gateway_codecs import ErrorCode

        name = ErrorCode.describe(self.code)
        return f"{name}: {self.reason}" if self.reason else name


class OpenRefused(CircuitBroken):
    """The far side (or a hop on the route) answered OPEN with OPEN_FAIL."""


class CarrierLost(CircuitBroken):
    """The carrier under a circuit went away (broken link, keepalive timeout, GOAWAY)."""


class SessionError(TunnelgateError):
    """Why a relayed session ended badly (its socket broke, the gateway shut down), for
    the session's record and log line."""


class GatewayShutdown(SessionError):
    """The gateway is shutting down: its sessions end; a relay's resumable ones move on
    (their endpoints resume them over another route, or when it is back)."""
