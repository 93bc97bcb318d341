# shellcheck shell=bash
# What the two GPU calls' scripts share, sourced by both: scripts/gpu_acceptance.sh (call 1)
# and scripts/gpu_speed.sh (call 2). One copy of the argument parsing, the plan arithmetic
# (every step's limit, the time a step carries over to the next, the deadline), the step
# runner and the report/finish plumbing, so that the two calls cannot drift apart in how they
# spend a budget that only a lent GPU tests. Each script keeps its own plan table, its own
# steps and their order, so that a reader sees a call's whole plan in that one file.
#
# Functions only: sourcing it runs nothing. Bash and coreutils only (the GPU machine is bare
# and may get the checkout without .git). The caller sets, before it calls these:
#   SCRIPT       its name in messages (gpu_acceptance, gpu_speed)
#   USAGE        its usage line, quoted in argument errors
#   PATH_OPTIONS an associative array: option -> the variable its path goes to
#                (e.g. [--bundle]=BUNDLE), the defaults set beforehand
#   START REPO   the start time (date +%s) and the checkout root
#   and, after parse_args, the plan (below): BUDGET, RESERVE, MIN_REST, PLAN_GPU, SMOKE_LIMIT.
# parse_args sets OUT_DIR, SMOKE and PLAN_ONLY; start_run sets WORK and DEADLINE; the caller
# sets PY (the interpreter) before the first step.
#
# The plan, PLAN_GPU: one line per step, "name limit what", in the order the steps run; the one
# source of every step's limit. --plan prints it; step() reads its limit from it (a floor: a
# step also gets the time the steps before it left unused); the deadline is derived from it.
# A limit of "rest" marks the elastic step (last, it gets what is left, and runs only with at
# least MIN_REST s); "reports" is not a step but the allowance for gpu_report.py after each
# step. RESERVE: the seconds after the deadline (the last report, the archive, timeout's grace).
# --cpu-smoke: every step gets SMOKE_LIMIT instead, and the budget is the sum of them.

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    echo "gpu_steps.sh: error: a library for scripts/gpu_acceptance.sh and gpu_speed.sh; source it, do not run it" >&2
    exit 2
fi

fail() {  # fail MESSAGE: the one-line error of a call that cannot start (exit 2)
    echo "$SCRIPT: error: $*" >&2
    exit 2
}

parse_args() {  # parse_args "$@": OUT_DIR, --cpu-smoke, --plan and the caller's PATH_OPTIONS
    OUT_DIR= SMOKE=0 PLAN_ONLY=0
    while (($#)); do
        case $1 in
            --cpu-smoke) SMOKE=1 ;;
            --plan) PLAN_ONLY=1 ;;
            -*)
                [[ -n ${PATH_OPTIONS[$1]:-} ]] || fail "unknown option $1 ($USAGE)"
                [[ $# -ge 2 && -n $2 ]] || fail "$1 needs a path"
                printf -v "${PATH_OPTIONS[$1]}" '%s' "$2"
                shift ;;
            *) [[ -z $OUT_DIR ]] || fail "one OUT_DIR only, got $OUT_DIR and $1"
               OUT_DIR=$1 ;;
        esac
        shift
    done
}

run_mode() { ((SMOKE)) && echo cpu-smoke || echo gpu; }

# ---- the plan's arithmetic
plan_rows() { printf '%s\n' "$PLAN_GPU" | awk 'NF { print $1, $2 }'; }
plan_limit() {  # plan_limit NAME: its limit in this mode ("rest" for the elastic step on the GPU)
    local limit
    limit=$(plan_rows | awk -v n="$1" '$1 == n { print $2 }')
    [[ -n $limit ]] || { echo "$SCRIPT: internal error: step $1 is not in the plan" >&2; exit 3; }
    ((SMOKE)) && limit=$SMOKE_LIMIT
    echo "$limit"
}
fixed_total() {  # the reserve and every limit but the elastic step's
    local sum=$RESERVE name limit
    for name in $(plan_rows | awk '{ print $1 }'); do
        limit=$(plan_limit "$name")
        [[ $limit == rest ]] || sum=$(( sum + limit ))
    done
    echo "$sum"
}
budget() { ((SMOKE)) && fixed_total || echo "$BUDGET"; }
rest_share() { local r=$(( $(budget) - $(fixed_total) )); echo $(( r > 0 ? r : 0 )); }  # the elastic step's planned seconds
reserved_after() {  # reserved_after NAME: the plan seconds still owed to the steps after NAME and to the reports
    local sum=0 after=0 name limit
    for name in $(plan_rows | awk '{ print $1 }'); do
        limit=$(plan_limit "$name")
        [[ $limit == rest ]] && limit=$(rest_share)
        if ((after)) || [[ $name == reports ]]; then sum=$(( sum + limit )); fi
        [[ $name == "$1" ]] && after=1
    done
    echo "$sum"
}
plan_steps() { plan_rows | awk '$1 != "reports" { print $1 }' | paste -sd, -; }  # "reports" is an allowance, not a step
print_plan() {  # the plan as --plan prints it; the name column is as wide as the longest name, plus one
    local name limit what fixed rest width
    fixed=$(fixed_total) rest=$(rest_share)
    width=$( { plan_rows; echo final; } | awk '{ if (length($1) > w) w = length($1) } END { print w + 1 }')
    echo "$SCRIPT plan, $( ((SMOKE)) && echo "cpu-smoke mode (every step ${SMOKE_LIMIT} s; the notes are the GPU run's)" || echo gpu mode): steps in order, each with its time limit (a floor: a step also gets what the steps before it left unused)"
    while read -r name limit what; do
        [[ -n $name ]] || continue
        limit=$(plan_limit "$name")
        if [[ $limit == rest ]]; then
            printf '  %-*s %4s s + the time the steps above leave unused (skipped under %s s): %s\n' "$width" "$name" "$rest" "$MIN_REST" "$what"
        else
            printf '  %-*s %4s s  %s\n' "$width" "$name" "$limit" "$what"
        fi
    done <<< "$PLAN_GPU"
    printf '  %-*s %4s s  after the deadline: the last report, the archive, timeout'"'"'s grace\n' "$width" final "$RESERVE"
    echo "total: $(( fixed + rest )) s"
}
plan_or_out_dir() {  # --plan: print the plan and exit 0 (runs nothing, no python); else an OUT_DIR is required
    if ((PLAN_ONLY)); then
        print_plan
        exit 0
    fi
    [[ -n $OUT_DIR ]] || fail "no OUT_DIR ($USAGE)"
}

# ---- the bundle must be this checkout's (GPU mode): a stale sdrun wheel would be tested
# silently. Bash and sha256sum only (the checkout may arrive without .git). Before anything
# runs or is written: a refused call leaves no output folder.
check_bundle() {
    ((SMOKE)) && return 0
    BUNDLE_VERDICT=$(bash "$REPO/scripts/gpu_bundle.sh" --check "$BUNDLE" 2>&1) || fail "$BUNDLE_VERDICT"
}

start_run() {  # start_run WORK_PREFIX LOG_NAME: the output and work folders, everything from here logged
    mkdir -p "$OUT_DIR"
    OUT_DIR=$(cd "$OUT_DIR" && pwd)
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")
    exec > >(tee -a "$OUT_DIR/$2") 2>&1  # the whole script's output from here (exec in a function: the shell's own)
    export PYTHONUNBUFFERED=1
    DEADLINE=$(( $(budget) - RESERVE ))  # seconds from START by which every step has ended
    : > "$WORK/steps.tsv"
    echo "$SCRIPT: $(run_mode) mode, out $OUT_DIR, work $WORK, $(date -u +%FT%TZ)"
    ((SMOKE)) || echo "$SCRIPT: $BUNDLE_VERDICT"
}

# ---- steps
record() {  # record NAME RC MS LIMIT [NOTE]: one line of steps.tsv (the report reads it), with the plan's limit
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" "$(plan_limit "$1")" >> "$WORK/steps.tsv"
}

skip() {  # skip NAME REASON: a step that cannot run in this mode, recorded with its reason
    echo "---- $1: skipped: $2"
    record "$1" -2 0 0 "skipped: $2"
}

step() {  # step NAME CMD...: run from the work folder within its limit and the deadline
    # Its limit: the plan's, plus whatever the steps before it left unused, but never the time
    # owed to the steps after it (their plan limits and the reports' allowance stay theirs); the
    # elastic step ("rest") gets all that is left. So every step keeps at least its plan limit
    # (as long as the reports keep to their allowance), and time saved early goes to the next
    # step, the more valuable one, if it needs it.
    local name=$1 plan limit left min t0 rc
    shift
    plan=$(plan_limit "$name") || exit 3
    left=$(( DEADLINE - ($(date +%s) - START) ))
    if [[ $plan == rest ]]; then
        limit=$left min=$MIN_REST
    else
        limit=$(( left - $(reserved_after "$name") )) min=10
        (( limit < plan )) && limit=$plan
        (( limit > left )) && limit=$left
    fi
    if (( limit < min )); then
        echo "---- $name: skipped, ${left}s left before the ${DEADLINE}s deadline (it needs ${min}s)"
        record "$name" -1 0 "$(( left > 0 ? left : 0 ))" "skipped: out of time"
        return 0
    fi
    t0=$(date +%s%N)
    echo "---- $name (limit ${limit}s): $*"
    # Its output also goes to WORK/NAME.log (the report reads pytest's from there when a
    # timeout kept pytest from writing its junit file).
    (cd "$WORK" && timeout --kill-after=5 "$limit" "$@") 2>&1 | tee "$WORK/$name.log"
    rc=${PIPESTATUS[0]}
    record "$name" "$rc" "$(( ($(date +%s%N) - t0) / 1000000 ))" "$limit"
    echo "---- $name: exit $rc"
    return 0
}

step_install() {  # the install step of both calls (GPU mode): the bundle's wheels, then tests/ to the work folder
    # The wheels (no dependencies, no index) go to a temp target that leads PYTHONPATH, and
    # everything runs from the work folder, so sdrun is the wheel's (its config tree as
    # packaged) and the checkout's sources cannot shadow it. --cpu-smoke: the interpreter's own.
    if ((SMOKE)); then
        skip install "cpu-smoke runs the interpreter's own sdrun"
    else
        step install "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target "$WORK/site" "$BUNDLE"/wheels/*.whl
        export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    cp -r "$REPO/tests" "$REPO/pyproject.toml" "$WORK/"
}

run_report() {  # run_report [ARGS...]: scripts/gpu_report.py over what has finished, with the call's own ARGS
    # Both reports are written atomically, so a kill mid-write keeps the last ones.
    local extra=()
    ((SMOKE)) || extra=(--stamp "$BUNDLE/STAMP")
    timeout 60 "$PY" "$REPO/scripts/gpu_report.py" "$@" --work "$WORK" --out "$OUT_DIR" --mode "$(run_mode)" \
        --elapsed "$(( $(date +%s) - START ))" --expect-steps "$(plan_steps)" "${extra[@]}" \
        || echo "$SCRIPT: report failed (exit $?)"
}

finish() {  # the last line, and exit 0 (the steps' exit codes are in the report, not in this one)
    echo "$SCRIPT: done in $(( $(date +%s) - START )) s; $(ls "$OUT_DIR" | wc -l) files in $OUT_DIR"
    # The work folder (call 1: 35k unpacked images) is left on the lent machine, which is
    # discarded anyway: deleting it there would only spend device time. Elsewhere it is removed.
    ((SMOKE)) && rm -rf "$WORK"
    exit 0
}
