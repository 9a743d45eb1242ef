"""The purification engine: samplers, purifiers, the bulk pipeline; the networks run on `puregen.backends`."""
