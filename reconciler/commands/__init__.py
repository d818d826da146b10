"""The `reconcile` command: `cli` holds the table of subcommands and renders errors once;
`common` is what every subcommand shares (exit codes, --config/-v, parsing); each other
module is one subcommand with its own logic (`plan`, the default: plan and apply; `apply_saved`
with `saved_plan`, the file it checks; `validate`, `schema`, `observe`, `status`, `watch`,
`cache`, `rebuild` for `records rebuild`, `adopt`, `nova` with `nova_layout` for
`import-nova`, `disks` and `wait` over reconciler.client) or the edge that turns an
unexpected exception into one line (`internal`)."""
