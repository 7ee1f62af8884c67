"""``python -m bitfit_peft.cli``."""

from bitfit_peft.cli import app

app(prog_name="bitfit-peft")
