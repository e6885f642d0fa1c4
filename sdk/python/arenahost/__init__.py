"""arenahost: Python SDK for arenahost plugins and pipelines."""
