"""Event-driven cache invalidation: consumes the catalog event stream."""
