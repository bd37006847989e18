"""The data plane: what moves a session's bytes between a local socket and a circuit, or
between two circuits (stream relays, the datagram relay, local sockets), and the record every session
leaves."""
