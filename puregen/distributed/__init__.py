"""Ray Data integration for sharded purification (planned)."""
