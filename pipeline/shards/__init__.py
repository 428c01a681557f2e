"""Shard building, indexing and verification (``relic shards``)."""
