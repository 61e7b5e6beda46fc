"""Empty: the radix index is one class in kvbridge/radix.py.

This file remains only because tests/test_layering.py (outside kvbridge) still lists it; delete
both together.
"""
