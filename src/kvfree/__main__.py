"""``python -m kvfree`` = the ``kvfree`` command (also what ``torchrun -m kvfree`` launches)."""

from kvfree.cli import main

main()
