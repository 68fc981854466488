"""The console side of the command line that is not a result's own view (a run's metrics table)."""
