"""S6 for Python: the distributed shared object space."""
