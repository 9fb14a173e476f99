"""`python -m emu` runs the same CLI as the `emu` script."""

from emu.cli import main

main()
