"""The control loop (`reconcile watch`) and what it keeps: the manifest index, the work
queue, each instance's status and outcome, metrics; `session` is one reconcile (load,
observe, plan) shared by the one-shot commands and the loop."""
