"""What a stream can do beyond trio's stream API, for the relays that use it: abort with
RST instead of closing, push what arrives straight into a sink, take bytes without
waiting. Circuits and local sockets declare these; relays ask with isinstance. Below the
carriers and the relay engine, so that neither imports the other for them."""

from __future__ import annotations

import abc
from collections.abc import Callable


class Abortable(abc.ABC):
    """A stream that can signal an abort (a circuit: RST) instead of a clean close."""

    __slots__ = ()

    @abc.abstractmethod
    def abort(self, reason: str) -> None: ...


class PushSource(abc.ABC):
    """A stream that can push what arrives straight into a sink (a circuit)."""

    __slots__ = ()

    sink: Callable[[bytes], int] | None
    sunk: int


class NonBlockingSink(abc.ABC):
    """A stream that can take bytes without waiting (a local socket, a circuit)."""

    __slots__ = ()

    @abc.abstractmethod
    def try_send(self, data: bytes | bytearray | memoryview) -> int: ...
