"""Test-time adversarial evaluation: adaptive attacks on purify-then-classify defenses (`attacks`) and the
robust-accuracy judgement on fresh purifications."""
