"""The built-in purification methods, one module each: every module in this package is loaded (and so
registered) on the first registry lookup. A new built-in method is one new module here."""
