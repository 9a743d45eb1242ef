"""Purification on a Ray cluster (`ray_data`): a callable class for `ray.data.Dataset.map_batches`.

Ray is an optional extra (`pip install 'puregen[ray]'`); importing this package does not need it.
"""
