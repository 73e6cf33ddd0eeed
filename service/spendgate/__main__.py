"""Run the command line as python -m spendgate."""

from spendgate.cli import main

main()
