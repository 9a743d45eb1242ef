"""Networks (plain nn.Modules, no purification logic) and their checkpoint formats."""
