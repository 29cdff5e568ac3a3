"""Code shared by every service: configuration, the bus, logging, service lifecycle, store clients."""
