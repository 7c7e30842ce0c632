"""Lower bounds on epsilon from one training run with m randomly included canaries, and the
power of such an audit.

Why: a DP run reports an upper bound on epsilon, computed from the noise the code was told to
add. An audit measures a lower bound from what the run actually released: if the lower bound
exceeds the claimed epsilon, the implementation (noise, clipping, sampling, accounting) is
broken. One-run auditing (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training
Run", NeurIPS 2023, arXiv:2305.08846) needs a single training run: m canaries are each included
independently with probability 1/2 (a secret coin), the auditor scores every canary from the
released output, guesses "in" for its top ``k_plus`` scores and "out" for its bottom ``k_minus``
(abstaining on the rest), and counts ``v`` correct guesses out of ``r = k_plus + k_minus``.

The deciding bound (:func:`epsilon_lower_fdp`, ``AuditResult.epsilon_lower``). Mahloujifar,
Melis & Chaudhuri ("Auditing f-Differential Privacy in One Run", ICML 2025, arXiv:2410.22235)
bound the guessing game with a whole trade-off curve f. Their recursion (:func:`fdp_rejects`),
for k = 2 classes (in / out) with abstentions: start from the probability beta of the observed
outcome (>= v correct of r), with per-canary correct mass x_v = beta v / m and incorrect mass
y_v = beta (r - v) / m; for i = v - 1 .. 0, flipping one canary's coin turns a correct guess at
level i + 1 into an incorrect one at level i, so f-DP forces y_i = max(y_{i+1}, B^-1(x_{i+1}))
with B^-1(x) = f(1 - x) (the least probability of an event under one hypothesis given
probability x under the other), and the outcomes with exactly i correct add x_i - x_{i+1} =
i / (r - i) * (y_i - y_{i+1}). The hypothesis is rejected when the guesses would need more mass
than the auditor spent: x_0 + y_0 > r / m. With the (epsilon, delta) curve
f(a) = max(0, 1 - delta - e^eps a, e^-eps (1 - delta - a)), which every (epsilon, delta)-DP
mechanism satisfies, a rejection refutes the (epsilon, delta) claim; the largest epsilon
rejected is the run's ``epsilon_lower``, which holds with probability >= 1 - beta over the
coins.

Beside it (diagnostics, never used to decide): Steinke et al.'s binomial bound
(:func:`p_value`, :func:`epsilon_lower_binomial`; their Theorem 3.1)::

    P[W >= v] <= f(v) + 2 m delta * max_{i = 1..m} (f(v - i) - f(v)) / i,
    f(v) = P[Binomial(r, p) >= v],   p = e^epsilon / (1 + e^epsilon),

whose 2 m delta term caps it near 6.2 at delta = 1e-5 whatever m is (so it could never refute
an epsilon-8 claim; the f-DP bound reaches 8.1 at m = 16000 guesses all right), and the largest
mu-GDP curve G_mu(a) = Phi(Phi^-1(1 - a) - mu) rejected (:func:`mu_lower`, as epsilon at the
run's delta; DP-SGD is close to, not exactly, Gaussian-DP).

Choosing the guesses (:func:`guess_grid`, :func:`audit`). The best of a few rules is reported;
a maximum over rules is a multiple test, so every rule is tested at beta / |grid|
(Bonferroni: the probability that any rule rejects a true claim is at most beta, whatever the
dependence). The default grid has 7 symmetric rules (k_plus = k_minus = 1, 2, 5, 10, 20, 30 or
50% of m: with noisy scores both tails carry information) and 4 "in"-only rules (k_plus = 1,
10, 30 or 45% of m, k_minus = 0): a canary that is included but never Poisson-sampled, which
happens with probability (1 - q)^steps (~0.2% at 6 epochs), scores like an excluded one, so
the "out" guesses of a nearly noiseless run always hold a few errors, which cap the symmetric
rules below epsilon 8 at any m; the top scores of such a run are all included canaries.
Several attacks on one run (the twin's plain scores and its replay of the public seed's noise)
are tested at beta / attacks each, so the largest of their bounds still holds at 1 - beta.

What one run can show (:func:`max_lower`): even with every guess right, m canaries prove at
most about ln(m / ln(tests |grid| / beta)) (m = 1000: 5.1, 2^17: 10.0 with 11 rules and two
attacks), so a claim above that cannot be refuted, however broken the run.
:func:`canaries_for` picks m from the claimed epsilon: at least 2^17 (at the demo's epsilon 1
the simulated power levels off there: 2^16 to 2^19 canaries all catch about half the
calibrated noise), doubled until the attainable bound exceeds epsilon + 1.

Power (:func:`audit_power`): the smallest noise scaling an audit detects, from a simulation of
the gradient canaries' scores (Poisson-sampled Dirac canaries of norm C under Gaussian noise,
:func:`step_llr`) with the twin's own (m, q, steps, sigma), without the real gradients (which
only add variance: the simulation is optimistic where they are large).

The noise check (:class:`NoiseCheck`): two exact tests on the noised coordinates a white-box
auditor sees, at level ``NOISE_ALPHA`` each: less noise than stated, and noise that follows
the public seed. They catch what the bound cannot see at a large epsilon, but they test the
noise, not epsilon.

numpy and scipy only, so the statistics are tested on their own (randomised response).

The package, module by module (each names what it owns):

- ``guesses``: the guessing rules and their correct counts;
- ``bounds``: the lower bounds themselves (Steinke et al.'s binomial bound, the f-DP and GDP
  bounds, the fewest correct guesses that refute a claim);
- ``runs``: the audit of one run (best rule, Bonferroni), its record, recomputation, how many
  canaries, what one run can show;
- ``noise``: the noise check (less noise than stated, noise that follows the public seed);
- ``power``: what an audit of these shapes catches (a simulation).
"""

from privdom_ray.audit_bound.bounds import (
    DEFAULT_BETA,
    approx_dp_inverse,
    critical_correct,
    epsilon_lower_binomial,
    epsilon_lower_fdp,
    fdp_rejects,
    gdp_delta,
    gdp_epsilon,
    gdp_inverse,
    gdp_rejects,
    mu_lower,
    p_value,
)
from privdom_ray.audit_bound.guesses import (
    GUESS_FRACTIONS,
    TOP_FRACTIONS,
    GuessCount,
    count_correct,
    guess_grid,
)
from privdom_ray.audit_bound.noise import NOISE_ALPHA, NoiseCheck, noise_check
from privdom_ray.audit_bound.power import AuditPower, PowerSetting, audit_power, step_llr
from privdom_ray.audit_bound.runs import (
    MAX_CANARIES,
    MIN_CANARIES,
    AuditResult,
    RunAudit,
    audit,
    canaries_for,
    max_lower,
    recompute,
    run_audit,
)

__all__ = [
    "GUESS_FRACTIONS",
    "TOP_FRACTIONS",
    "GuessCount",
    "count_correct",
    "guess_grid",
    "DEFAULT_BETA",
    "p_value",
    "epsilon_lower_binomial",
    "gdp_inverse",
    "approx_dp_inverse",
    "fdp_rejects",
    "epsilon_lower_fdp",
    "gdp_rejects",
    "mu_lower",
    "gdp_delta",
    "gdp_epsilon",
    "critical_correct",
    "MIN_CANARIES",
    "MAX_CANARIES",
    "AuditResult",
    "audit",
    "RunAudit",
    "run_audit",
    "recompute",
    "max_lower",
    "canaries_for",
    "NOISE_ALPHA",
    "NoiseCheck",
    "noise_check",
    "step_llr",
    "PowerSetting",
    "AuditPower",
    "audit_power",
]
