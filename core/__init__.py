"""The shared core that the gRPC service, the invalidator and the tools all import, and that
imports none of them: the cache protocol, keys and tags, the event contract, settings, database
access and the metrics registry."""
