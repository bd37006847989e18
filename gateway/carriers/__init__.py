"""The carrier side: connections to peer gateways (transports, links, the carrier and its write
coalescer) and the circuits multiplexed on them."""
