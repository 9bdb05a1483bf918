"""Ray jobs over the data: synthetic source and its server, download, ingest (embed and index to come)."""
