"""Estimates: pure functions of a model skeleton and settings, returning frozen results."""
