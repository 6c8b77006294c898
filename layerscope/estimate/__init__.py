"""Estimates: pure functions of a model skeleton and settings, returning frozen results in
bytes, FLOPs and seconds.

``memory`` predicts the peak GPU memory of a step (traced on fake tensors), ``time`` the step
and training time, ``hardware`` is the GPU catalogue.
"""
