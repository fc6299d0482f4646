"""Steering a PEP search to its budgets on schedule (the `budget` pruning of `search`): a cubic plan
of non-zero counts over steps, and the threshold scale gk set from the counts the search already
takes. Design, and how it was chosen: docs/design/budget_controller.md.
"""

import math

GROW, SHRINK = 1.5, 0.5
FIRST_DELTA, MIN_DELTA, MAX_DELTA = 0.05, 1e-4, 2.0
# gk within [e^-80, e^80]; e^80 is finite in float32 (whose largest is about e^88.7). The range
# must be wide: where one threshold is shared by many entries (global, dimension and the field
# modes) the loss pulls each s down by about lr per step under Adam and gk must rise as fast (at
# lr 1e-2 to about e^52 over 3,000 steps on MovieLens-100K). Needing e^80 means s near -83 for
# thresholds the size of W's entries: sigmoid(s) nears float32's underflow, past any gk's reach.
LOG_GK_RANGE = (-80.0, 80.0)
DEADBAND = 1e-3  # |e| below this (0.1% of the count) leaves gk alone
# Sensitivity k = -d ln(count) / d ln(gk), a running mean of what the last changes did; a step is
# at most |e| / max(k, 1), Newton's step, so that a sensitive table (one shared threshold, high
# sparsity) is not pushed past the plan and set oscillating.
SENSITIVITY_RATE, SENSITIVITY_MAX, SENSITIVITY_MIN_CHANGE = 0.3, 50.0, 1e-3
# Each segment of the plan passes its budget at this fraction of its cubic, still falling (at about 10%
# of the segment's mean slope): a cubic that flattens exactly at the budget would let noise of a
# few counts decide the step at which the budget is passed.
ARRIVAL = 0.8


def _ease(x):
    return 1 - (1 - x) ** 3


def cubic_planned_steps(counts, initial_nnz, steps):
    """Planned step of each count (largest first): where the cubic from `initial_nnz` at step 0 to
    the last count at `steps` crosses it."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"the step budget must be a positive int, got {steps!r}")
    last = counts[-1]
    planned = []
    for count in counts:
        if count >= initial_nnz or initial_nnz == last:
            planned.append(1)
            continue
        # initial - (initial - last) * (1 - (1 - x)^3) = count
        fraction = (initial_nnz - count) / (initial_nnz - last)
        x = 1 - (1 - fraction) ** (1 / 3)
        planned.append(max(1, round(x * steps)))
    for i in range(1, len(planned)):  # budgets met at step 0, or closer than a step apart
        planned[i] = max(planned[i], planned[i - 1] + 1)
    return planned


class BudgetController:
    """Plans the non-zero count over steps and sets gk to follow the plan.

    `counts`: the budgets as non-zero counts, largest first; `planned_steps`: the step at which each
    is to be passed, ascending; `initial_nnz`: the step-0 count. `update(step, nnz)` returns the gk
    for the next steps.
    """

    def __init__(self, counts, planned_steps, initial_nnz, gk=1.0):
        counts, planned_steps = list(counts), list(planned_steps)
        if len(counts) != len(planned_steps) or not counts:
            raise ValueError(f"need one planned step per budget, got {len(planned_steps)} steps for {len(counts)} budgets")
        if counts != sorted(counts, reverse=True):
            raise ValueError(f"budgets must be given largest first, got {counts}")
        if any(isinstance(s, bool) or not isinstance(s, int) for s in planned_steps) or \
                any(b <= a for a, b in zip([0] + planned_steps, planned_steps)):
            raise ValueError(f"planned steps must be positive ints, strictly increasing, got {planned_steps}")
        if gk <= 0:
            raise ValueError(f"the controller scales gk multiplicatively; it must start > 0, got {gk}")
        self.counts, self.planned_steps, self.initial_nnz = counts, planned_steps, int(initial_nnz)
        self.log_gk, self.delta, self.last_sign = math.log(gk), FIRST_DELTA, 0
        self.last_change, self.last_log_nnz, self.sensitivity = 0.0, None, 1.0

    @property
    def gk(self):
        return math.exp(self.log_gk)

    @property
    def saturated(self):
        """gk is at the top of its range: the thresholds have fallen too far for it to prune more."""
        return self.log_gk >= LOG_GK_RANGE[1]

    def planned_nnz(self, step):
        """The plan's count at `step`; past the last planned step it falls on at the slope it had there."""
        start_step, start = 0, self.initial_nnz
        for i, (count, end_step) in enumerate(zip(self.counts, self.planned_steps)):
            count = min(count, start)  # a budget met before its segment holds the count, never un-prunes
            last = i == len(self.counts) - 1
            if step < end_step or last:
                x = min(ARRIVAL, (step - start_step) / (end_step - start_step) * ARRIVAL)
                planned = start - (start - count) * _ease(x) / _ease(ARRIVAL)
                if step > end_step:  # so that a count trailing the plan by a steady margin still passes the budget
                    slope = (start - count) * 3 * (1 - ARRIVAL) ** 2 * ARRIVAL / _ease(ARRIVAL) / (end_step - start_step)
                    planned -= slope * (step - end_step)
                return max(planned, 0.0)
            start_step, start = end_step, count

    def update(self, step, nnz):
        """Takes the count after `step`; returns the new gk."""
        log_nnz = math.log(max(nnz, 1))
        if self.last_log_nnz is not None and abs(self.last_change) > SENSITIVITY_MIN_CHANGE:
            observed = -(log_nnz - self.last_log_nnz) / self.last_change
            self.sensitivity += SENSITIVITY_RATE * (min(max(observed, 0.0), SENSITIVITY_MAX) - self.sensitivity)
        error = log_nnz - math.log(max(self.planned_nnz(step), 1.0))
        sign = 0 if abs(error) < DEADBAND else (1 if error > 0 else -1)
        change = 0.0
        if sign:
            if sign == self.last_sign:
                self.delta = min(self.delta * GROW, MAX_DELTA)
            elif self.last_sign:
                self.delta = max(self.delta * SHRINK, MIN_DELTA)
            change = sign * min(self.delta, abs(error) / max(self.sensitivity, 1.0))
            new_log_gk = min(max(self.log_gk + change, LOG_GK_RANGE[0]), LOG_GK_RANGE[1])
            change, self.log_gk = new_log_gk - self.log_gk, new_log_gk
        self.last_sign, self.last_change, self.last_log_nnz = sign, change, log_nnz
        return self.gk

    _STATE = ("log_gk", "delta", "last_sign", "last_change", "last_log_nnz", "sensitivity")

    def state_dict(self):
        return {name: getattr(self, name) for name in self._STATE}

    def load_state_dict(self, state):
        for name in self._STATE:
            setattr(self, name, state[name])
