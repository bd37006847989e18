"""Identities, TLS contexts, per-peer policy and end-to-end protection."""
