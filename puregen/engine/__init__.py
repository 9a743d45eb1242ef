"""The purification engine: samplers, purifiers, network evaluation, the bulk pipeline."""
