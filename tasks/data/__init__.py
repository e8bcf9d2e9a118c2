"""The data layer: raw readers, Arrow files between stages, row hashes, batching, chat and prompts, ingest."""
