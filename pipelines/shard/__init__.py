"""The one resharder: (pool, kept uid set) -> final webdataset shards + per-shard Parquet + sizes.json + manifest."""
