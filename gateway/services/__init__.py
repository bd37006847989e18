"""Built-in standard services a gateway serves as targets (RFC 862, 863, 864, 867, 868)."""
