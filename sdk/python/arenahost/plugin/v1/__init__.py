"""arenahost.plugin.v1: generated from shared/proto/arenahost/plugin/v1/plugin.proto by `make proto`."""
