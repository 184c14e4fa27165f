"""Jobs: long-running pipelines (dataset builds, training, exports) as child processes the server supervises.

  spec.py     JobSpec: what a job runs (the child's command) and which data-root resources it reads and makes
  store.py    the jobs and job_events tables in the state database (state.db, SQLite WAL)
  runner.py   one child process: its own process group, output to jobs/<id>/log.txt, tailed; cancel and kill
  launch.py   the child's first step: die with the server (PR_SET_PDEATHSIG), then exec the job's command
  progress.py a training run's metrics.jsonl records as step and eval events, and the job's progress
  manager.py  JobManager: the bounded queue, state changes as events, watchers, recovery after a restart
  requests.py StartTraining and StartExport requests checked and turned into JobSpecs
"""
