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

# job_port: the rendezvous port the trainer would pick (deit/rendezvous.py: MASTER_PORT, else one derived from
# the SLURM job id, else 29500); run from the repository root, as the launchers are.
job_port() {
  "$PYTHON" -m deit.rendezvous
}
