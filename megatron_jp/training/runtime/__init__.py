"""What keeps a run alive and honest around the loop: the run-directory locks (run_lock.py), the
watchdog that stops every rank when one hangs (watchdog.py), the SIGINT/SIGTERM stop request (stop.py)
and the environment report (environment.py)."""
