"""`python -m fedtext.cli ...`, as the coordinator starts its API and tests call the CLI."""

from fedtext.cli import main

main()
