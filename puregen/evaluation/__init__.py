"""Evaluation harness: poison a training set, purify it, train a classifier, measure.

* `datasets`: the real data the harness uses (Fashion-MNIST, class-balanced
  subsets, scikit-learn's digits as public out-of-distribution data).
* `triggers`: additive triggers (saving, loading, budget checks, applying).
* `attacks`: poison attacks (Narcissus so far).
* `harness`: train a classifier per defense and seed and measure natural
  accuracy and poison success.
* `demo`: the `puregen demo` job.
"""
