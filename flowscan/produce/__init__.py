"""The IMP producer: trains, prunes, rewinds and repeats, writing flowscan's own layout.

It builds on the torch layer `flowscan.train` (models, data, one round of training); the
scanner imports neither.
"""
