"""Poison attacks, the classifier harness and defense reports (planned: evaluation issue)."""
