"""``python -m spoold``: the ``spoold`` command."""

from spoold.daemon.cli import main

main()
