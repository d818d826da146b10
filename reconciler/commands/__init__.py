"""The `reconcile` command: `cli` holds the table of subcommands and renders errors once;
each other module is one subcommand (adopt, cache, import-nova, records rebuild, apply of a
saved plan) or the edge that turns an unexpected exception into one line (`internal`)."""
