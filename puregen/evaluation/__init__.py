"""Evaluation harness: poison a training set, purify it, train a classifier, measure.

* `datasets`: the real data the harness uses (Fashion-MNIST, class-balanced
  subsets, scikit-learn's digits as public out-of-distribution data).
* `triggers`: backdoor triggers, additive or patch (saving, loading, budget
  checks, applying).
* `poison_set`: a training set's poisons at given rows, saved once and put in
  place for every defense and seed.
* `clean_label`: the demo's clean-label poisons (a poison set).
* `attacks`, `attack_suite`: the poison attacks and what `puregen eval`
  crafts with them.
* `defending`, `defenses`: the defenses `puregen eval` applies.
* `harness`: the demo's classifier per defense and seed, and what it measures.
* `report`: measurements, their summary per (attack, defense), and the
  reports both commands write.
* `demo`, `eval_run`: the `puregen demo` and `puregen eval` jobs.
"""
