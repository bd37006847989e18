"""Identities, TLS contexts and per-peer policy."""
