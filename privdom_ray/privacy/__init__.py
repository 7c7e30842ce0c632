"""The privacy ledger: what was released, by which mechanisms, and what it costs.

Importing this module is cheap (no torch): the trial store and Tune's coordinating process read
ledgers; Opacus's accountants are imported only to compute an epsilon.

A DP trial releases the outputs of Gaussian mechanisms: every DP-SGD step (Poisson-subsampled
at rate q, noise multiplier sigma) and, when the loss weights come from the private training
labels, one release of the label counts (``lossweights.py``). The ledger lists every such
mechanism, so anyone can recompute epsilon without trusting this tool; epsilon_spent is
their composition under the accountant the grid names. PRV has failed numerically at large
epsilon (opacus #591, #601), so a PRV failure falls back to RDP and the ledger says so; RDP is
always computed as a cross-check.

Noise is calibrated here for the exact composition the run will perform (the steps the
sampler will take, plus any count release), never for an approximate step count.
"""

from __future__ import annotations

from privdom_ray.privacy.audit import (  # noqa: F401 (re-exported: the old privdom_ray.privacy names)
    INDEPENDENT_TOL,
    PLD,
    PLD_INTERVAL,
    AuditRow,
    ExpectedRun,
    audit_ledger,
    cached_calibration,
    check_epsilon,
    expected_ledger,
    ledger_differences,
    ledger_mechanisms,
    pld_epsilon,
)
from privdom_ray.privacy.ledger import (  # noqa: F401 (re-exported: the old privdom_ray.privacy names)
    MECHANISM_VERSION,
    SECRET_RANDOMNESS,
    Ledger,
    Mechanism,
    NoisePlan,
    calibrate,
    count_noise_multiplier,
    epsilon_of,
    gdp_mu,
    make_ledger,
    poisson_rate,
    steps_per_epoch,
)
