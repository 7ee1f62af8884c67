"""Compatibility with PEFT and transformers: what may break on an upgrade of either.

:mod:`~bitfit_peft.compat.registration` registers the tuner type; :mod:`~bitfit_peft.compat.patches` is the one
declared place where library functions are wrapped (a table of targets, reasons and tested versions).
"""
