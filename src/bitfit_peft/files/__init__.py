"""What touches disk: the adapter file format, the base fingerprint, atomic saves, the Hub card and path checks.

These modules stand on :mod:`bitfit_peft.names` and :mod:`bitfit_peft.errors` only (no tuner import), so the file
format can be read and checked without a model.
"""
