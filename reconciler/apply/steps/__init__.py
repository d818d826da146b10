"""One module per kind of step: create (and replace, whose first half is replace.py),
resize, update, delete (and release), migrate, ownership (take-over, hand-over).

Each opens with the order in which it creates and removes things and the crash windows
between them, and does its own checks under the lock. A step is handed a
`context.StepContext` (the record writer, the drivers, their locks) and what the executor
read under the action's lock (`context.Held`), never the executor itself."""
