"""`python -m jaxtl`: the command line."""

from jaxtl.cli import main

main()
