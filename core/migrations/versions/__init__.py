"""Migration revisions, applied in ``down_revision`` order (makes them package data)."""
