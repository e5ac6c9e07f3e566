"""A training run's wall-clock budget: how many steps fit, and how often to evaluate, given the speed
measured so far. The budget holds the whole run (loading, evaluations, checkpoints, the report card),
so the steps get what the rest leaves.
"""

TIMED_STEPS = 10  # steps timed, after one untimed step, before a time budget's first plan
PROBE_STEPS = 5  # steps timed, after one untimed step, to measure a width (their median)
EVALS_PER_RUN = 10  # evaluations over a run when eval_every is not given...
EVALUATION_SHARE = 0.05  # ...or fewer, when they would take more than this share of a time budget
FINISH_SECONDS = 2.0  # what a time budget keeps for after the loop: the report card's plot and sample replies
PLAN_EVERY = 25  # steps between a time budget's plans, each from the speed of the steps since the last
BUDGET_WIDTHS = (256, 384, 512)  # the hidden sizes a time budget picks from, when --hidden-size is not given
CHARACTERS_FOR_A_WIDER_MODEL = 3_000_000  # a width must train on this many in its budget, else a narrower one
# learned more in the same time (bench/RESULTS.md)


def plan_steps(budget_seconds: float, elapsed_seconds: float, step: int, seconds_per_step: float,
               evaluation_seconds: float, eval_every: int | None = None, evaluated_steps: list[int] = (),
               last_evaluation_seconds: float | None = None) -> tuple[int, int]:
    """(planned steps, steps between evaluations) for a run with a wall-clock budget, at `step` after
    elapsed_seconds: the steps left fill what the budget leaves after FINISH_SECONDS and the evaluations
    still to come, each taking evaluation_seconds with its checkpoints, the last last_evaluation_seconds
    (default: as the others; training's last check reads more). A given eval_every keeps its
    spacing; else up to EVALS_PER_RUN evaluations over the whole run, fewer when they would take more than
    EVALUATION_SHARE of the budget: those not yet done (evaluated_steps, of which the first measures what
    one costs and counts apart) are spread evenly from the last one to the end, so a change of speed
    does not bring more."""
    left = budget_seconds - elapsed_seconds - FINISH_SECONDS
    last_seconds = evaluation_seconds if last_evaluation_seconds is None else last_evaluation_seconds
    if eval_every:  # the last evaluation whole, the ones before it spread over the steps
        steps_left = (left - last_seconds) / (seconds_per_step + evaluation_seconds / eval_every)
        return step + max(1, int(steps_left)), eval_every
    evaluations = max(1, min(EVALS_PER_RUN, int(EVALUATION_SHARE * budget_seconds / evaluation_seconds)))
    evaluations_left = max(1, evaluations - max(0, len(evaluated_steps) - 1))
    before_the_last = (evaluations_left - 1) * evaluation_seconds
    planned = step + max(1, int((left - before_the_last - last_seconds) / seconds_per_step))
    since = evaluated_steps[-1] if evaluated_steps else step
    return planned, -(-(planned - since) // evaluations_left)


def training_seconds_of(budget_seconds: float) -> float:
    """What a budget leaves for training steps once its evaluations (at most their share) and finish are paid."""
    return budget_seconds * (1 - EVALUATION_SHARE) - FINISH_SECONDS


def widest_affordable(budget_seconds: float, seconds_per_step, characters_per_step: float) -> int:
    """The widest of BUDGET_WIDTHS that trains on CHARACTERS_FOR_A_WIDER_MODEL in what the budget leaves for
    training, at seconds_per_step(width) on this machine; the narrowest when none does. The narrowest is
    measured first, and a wider width only if it could fit with a step no slower than the narrowest's in
    proportion to the width (its FLOPs grow as the square), so a slow machine measures just one."""
    steps_needed = CHARACTERS_FOR_A_WIDER_MODEL / characters_per_step
    training_seconds = training_seconds_of(budget_seconds)
    narrowest, *wider = sorted(BUDGET_WIDTHS)
    narrowest_seconds = seconds_per_step(narrowest)
    for width in reversed(wider):
        could_fit = training_seconds / (narrowest_seconds * width / narrowest) >= steps_needed
        if could_fit and training_seconds / seconds_per_step(width) >= steps_needed:
            return width
    return narrowest
