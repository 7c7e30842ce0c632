"""FedAvg over sites that each train with their own DP-SGD guarantee.

Pure: no Ray, no file layout. The coordinator (:func:`run_federation`) sees model weights,
step counts, AUC numbers and k-anonymous score histograms, never images, labels or per-image
scores; how and where a site's work runs is injected (``update``/``validate``), so the same
code runs serially in a test and as Ray tasks in a sweep.

Privacy is per site: site s is Poisson-sampled at q_s = 1/ceil(N_s/B) and its noise
multiplier sigma_s is calibrated once, before round 1, for all the steps it will take over all
rounds, so its (epsilon, delta_s) guarantee covers the whole federation. Rounds never
re-calibrate: every round's accountant must show exactly (sigma_s, q_s, planned steps), and a
resumed run must find the checkpoint's (sigma_s, q_s) again, or it stops.

Every random stream of a site's round is seeded from (site key, site name, round, stream). For
DP trials each site's key is drawn from OS entropy when the trial starts and kept only in the
trial's private checkpoint (deleted when the trial is done): nobody outside the coordinator can
replay a site's noise or batches, while a resumed run is bit-identical to an uninterrupted one
(a round re-run after a crash releases exactly what the lost attempt released).

Trust model: a TRUSTED coordinator. Here the coordinator (the trial's own process, run by the
data owner's sweep) draws every site's key and holds all of them in its checkpoint, so each
site's (epsilon, delta) guarantee protects that site's training images against everyone who
sees the released model, tables and report, but NOT against the coordinator: with the keys it
can regenerate a site's noise and Poisson samples, subtract the noise from the site's update
and read its clipped gradient sum and which images each step used, i.e. against it the sites'
updates are not private at all. An untrusted coordinator could, besides, hand out keys it
chose (replayable noise), send sites crafted global models whose updates leak their inputs,
ask for more rounds or another sigma than the plan, or skip the noise; and it sees every
site's validation summary. A deployment that does not trust its coordinator must draw each
key at its site and never send it, have every site check the (sigma, q, steps) it is asked to
run against its own budget, and aggregate with secure aggregation.

What a site sends to the coordinator, each round: its noised model weights and step counts
(DP: covered by its epsilon), its released loss weights (DP: the noised label counts, covered),
timings, and a validation summary of the new global model on its validation images (which
DP-SGD does not protect: outside the guarantee): the site's macro AUC (one number) and, per
label, histograms of the positive and of the negative images' scores that are k-anonymous
(:func:`k_anonymous`: adjacent cells of a public 50-cell grid on [0, 1] merged until every
released bin holds at least ``MIN_BIN_IMAGES`` = 10 images, a label-class with fewer images
sent as nothing). No per-image score leaves a site, and no released count describes fewer
than 10 images; the pooled Youden thresholds resolve 0.02. For DP trials it
sends no training loss and no membership-inference statistic.

The package, module by module, in the order a round runs (each names what it owns):

- ``plan``: each site's training and accounting, fixed before round 1, and the seeded streams;
- ``site``: what a site does with the global model: its local DP-SGD update;
- ``validation``: what a site releases about a global model (k-anonymous score histograms);
- ``aggregate``: what the coordinator computes from the sites' messages (FedAvg, pooled
  thresholds);
- ``coordinator``: :func:`run_federation`, the rounds, checkpoints and the site ledgers.
"""

from privdom_ray.federated.aggregate import fedavg, on_public_cells, youden_from_histograms
from privdom_ray.federated.coordinator import (
    FederatedResult,
    UpdateFn,
    ValidateFn,
    run_federation,
    site_keys,
    site_ledger,
)
from privdom_ray.federated.plan import SitePlan, federation_of, plan_sites, stream_seed
from privdom_ray.federated.site import (
    SiteUpdate,
    TaskTiming,
    local_update,
    site_randomness,
    site_update_from_cache,
)
from privdom_ray.federated.validation import (
    HIST_BINS,
    MIN_BIN_IMAGES,
    SUMMARY_CELLS,
    SiteValidation,
    k_anonymous,
    score_histograms,
    site_validate_from_cache,
    validate_site,
)

__all__ = [
    "SitePlan",
    "federation_of",
    "plan_sites",
    "stream_seed",
    "TaskTiming",
    "SiteUpdate",
    "site_randomness",
    "local_update",
    "site_update_from_cache",
    "HIST_BINS",
    "MIN_BIN_IMAGES",
    "SUMMARY_CELLS",
    "SiteValidation",
    "score_histograms",
    "k_anonymous",
    "validate_site",
    "site_validate_from_cache",
    "fedavg",
    "on_public_cells",
    "youden_from_histograms",
    "UpdateFn",
    "ValidateFn",
    "FederatedResult",
    "site_keys",
    "run_federation",
    "site_ledger",
]
