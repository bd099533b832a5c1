"""The IMP producer: trains, prunes, rewinds and repeats, writing flowscan's own layout.

This subpackage imports torch; the scanner does not.
"""
