"""The cache-aside layer: Redis I/O (``store``), the read paths over it (``reader``) and the small
pure pieces they are built from (``breaker``, ``singleflight``, ``ttl``, ``wire``)."""
