"""arenahost.plugin: generated protocol packages."""
