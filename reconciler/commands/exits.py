"""The exit codes of `reconcile` and every subcommand, in a module that imports nothing,
so that the command table (cli.py) and a subcommand can name them without loading the
rest: `reconcile --version` and `--help` load only what they print (issue 27)."""

EXIT_OK = 0
EXIT_ERROR = 1  # an error: invalid input, a failed step, an internal error
EXIT_CHANGES = 2  # a dry run that would change something (-detailed-exitcode)
