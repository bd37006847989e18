"""tunnelgate: the trio program (config, identities, carriers, circuits, endpoints, CLI)."""
