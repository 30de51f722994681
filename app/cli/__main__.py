"""``python -m segue.cli``: the command line, as the ``segue`` script runs it."""

from segue.cli import main

main()
