"""Empty: the block store is one class in kvbridge/store.py.

This file remains only because tests/test_layering.py (outside kvbridge) still lists it; delete
both together.
"""
