"""Poison attacks, each written from its paper."""
