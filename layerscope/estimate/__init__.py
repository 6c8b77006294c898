"""Estimates: pure functions that return frozen results in bytes, FLOPs and seconds.

``hardware`` is the GPU catalogue, ``time`` the step-time and training-time model.
"""
