"""catalog gRPC service: cache-aside reads of products from PostgreSQL through Redis."""
