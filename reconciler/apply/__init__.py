"""Apply: carry out a Plan through the drivers, one recorded step at a time.

`executor` schedules the plan's steps (order, parallelism with --jobs, stopping);
`preconditions` checks, before the first change and again under each volume's lock, that
the state an action was planned from still holds; `steps/` holds one module per kind of
step, each doing its own checks under the volume's lock and writing its record through
the small interface of `steps/context.py`; `report` is what a person sees while it runs."""
