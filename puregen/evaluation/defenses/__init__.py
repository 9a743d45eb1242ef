"""Training-time defenses against data poisoning for the evaluation harness.

A defense here takes the (possibly poisoned) uint8 NHWC training set and returns the training set the
victim should learn from, together with any change to the victim's training recipe it needs, so the
harness can train and measure it exactly like the purification defenses.
"""
