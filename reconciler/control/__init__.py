"""The control loop (`reconcile watch`) and what it keeps: `loop` (threads, signals, the
run), `index` (the manifest directory as last read, and the writes that must settle),
`reconcile` (one reconcile of an instance, and a resync), `outcome` (the one mapping of a
result to its queue action, status conditions and metric label, shared with one-shot
runs), `workqueue`, `metrics`, `status` (each instance's status) and `writers` (whether a
process holds a manifest open for writing); `session` is one reconcile (load, observe,
plan) shared by the one-shot commands and the loop."""
