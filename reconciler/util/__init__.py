"""What every stage uses and none owns: logging, step boundaries for crash tests, and the
private state directory."""
