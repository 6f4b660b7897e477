# Sourced by the launchers (not run): the Python to use, and the rendezvous port.
# PYTHON: $PYTHON, else the checkout's .venv, else python3.
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHON

# split_dry_run ARGS...: DRY_RUN=1 when --dry-run is among them (anywhere); the other arguments in ARGS.
split_dry_run() {
  DRY_RUN=${DRY_RUN:-0}
  ARGS=()
  for a in "$@"; do
    if [[ "$a" == "--dry-run" ]]; then DRY_RUN=1; else ARGS+=("$a"); fi
  done
  export DRY_RUN
}

# job_port: MASTER_PORT if set; inside a SLURM job a port derived from the job id (15000 + id % 20000, as
# deit.distributed does), so two jobs sharing a node never both take 29500; else 29500.
job_port() {
  if [[ -n "${MASTER_PORT:-}" ]]; then echo "$MASTER_PORT"
  elif [[ "${SLURM_JOB_ID:-}" =~ ^[0-9]+$ ]]; then echo $((15000 + SLURM_JOB_ID % 20000))
  else echo 29500; fi
}
