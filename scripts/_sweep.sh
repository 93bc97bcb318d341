# Sourced by the paper scripts: where runs and outputs go, and one function to run a preset.
#   RUNS   sweep directories (default multirun/paper); one per preset: $RUNS/<preset>
#   OUT    tables and figures (default paper_results/, git-ignored)
#   SDRUN  the sdrun command (default: sdrun on PATH, else .venv/bin/sdrun)
# Extra arguments to a script are Hydra overrides for every sweep it runs (e.g. device=cuda:1).
set -euo pipefail
RUNS=${RUNS:-multirun/paper}
OUT=${OUT:-paper_results}
if [[ -z "${SDRUN:-}" ]]; then
  if command -v sdrun >/dev/null; then SDRUN=sdrun; else SDRUN=.venv/bin/sdrun; fi
fi

# sweep PRESET [OVERRIDES...]: run `sdrun train -m experiment=PRESET` into $RUNS/PRESET, unless
# that directory already exists (then its runs are reused: delete it to train again).
sweep() {
  local preset=$1; shift
  if [[ -e "$RUNS/$preset" ]]; then
    echo "reusing $RUNS/$preset (delete it to train again)" >&2
  else
    "$SDRUN" train -m "experiment=$preset" "hydra.sweep.dir=$RUNS/$preset" "$@"
  fi
}
