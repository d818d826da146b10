"""Apply: carry out a Plan through the drivers, one recorded step at a time.

`executor` schedules the plan's steps (order, parallelism, the record written before and
after each); `steps/` holds one module per kind of step, each doing its own checks under the
volume's lock; `report` is what a person sees while it runs."""
