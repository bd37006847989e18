"""Access endpoints: listeners whose clients name their destination (SOCKS5, HTTP CONNECT)."""
