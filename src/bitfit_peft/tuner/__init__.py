"""The tuner: what a PEFT maintainer would review upstream (config, layer, model, the per-call plan, targets).

Nothing here touches disk except :mod:`~bitfit_peft.tuner.hotswap`, which reads an adapter folder through the
strict read-only path of :mod:`bitfit_peft.files`. The tuner is the only writer of its adapter state.
"""
