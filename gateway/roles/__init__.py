"""Session roles: the entry (tunnel listeners), the exit and the relay hop (circuits a peer
opens)."""
