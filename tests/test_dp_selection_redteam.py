"""Red team of issue 26's DP epoch and threshold selection for untuned DP trials
(train/selection.py, kinds/standard.py's calibration, audit and guarantee). Each test passes
when the privacy claim holds and fails when it breaks. Real components, no mocks."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from privdom_ray.cache import SplitData
from privdom_ray.guarantee import Release, compose_validation
from privdom_ray.selection import validation as releases
from privdom_ray.selection.untuned import (
    check_validation,
    validation_entry,
    validation_epsilon,
    validation_noise,
)
from privdom_ray.train.selection import DPSelection, plan_state

N_LABELS = 5


def _val(n_patients: int = 30, heavy: int = 40, seed: int = 0) -> SplitData:
    """A validation split: patients of two images each plus one patient ("heavy") with many."""
    rng = np.random.default_rng(seed)
    pids = [f"p{i // 2}" for i in range(2 * n_patients)] + ["heavy"] * heavy
    n = len(pids)
    labels = (rng.random((n, N_LABELS)) < 0.4).astype(np.float32)
    labels[rng.random((n, N_LABELS)) < 0.1] = np.nan
    images = rng.integers(0, 255, size=(n, 8, 8), dtype=np.uint8)
    return SplitData(images, labels, np.array(["F", "M"] * (n // 2)), rng.uniform(20, 90, n),
                     patient=np.array(pids))  # fmt: skip


def _without(split: SplitData, keep: np.ndarray) -> SplitData:
    return dataclasses.replace(
        split, images=split.images[keep], labels=split.labels[keep], sex=split.sex[keep],
        age=split.age[keep], patient=split.patient[keep],
    )  # fmt: skip


def _utility_shift(sel_a: DPSelection, pa, ya, sel_b: DPSelection, pb, yb) -> float:
    """eps u / 2B difference of one epoch between two validation sets: the same seeded Gumbel
    on both sides cancels (real noisy_utility, injected generator)."""
    a = sel_a.noisy_utility(pa, ya, np.random.default_rng(7))
    b = sel_b.noisy_utility(pb, yb, np.random.default_rng(7))
    return a - b


# ------------------------------------------------------------- attack 1: the exponential mech


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 8.0])
def test_one_patient_with_many_images_moves_an_epoch_score_by_at_most_eps_over_two(epsilon):
    """Sensitivity of u (a SUM over patients of the clipped per-patient mean loss) is B when
    one patient (40 images) is removed, or all its predictions changed to the worst; removing
    one image (privacy unit image) moves it no more. So eps u/(2B) moves by <= eps/2 per
    epoch, and the mechanism is eps-bounded-range (eps/2 on add/remove)."""
    val = _val()
    state = plan_state(epsilon, 1e-5)
    sel = DPSelection.of(state, val)
    eps = sel.noise.checkpoint_epsilon
    rng = np.random.default_rng(1)
    probs = rng.random(val.labels.shape)
    heavy = val.patient == "heavy"
    worst = np.where(np.nan_to_num(val.labels) == 1, 1e-9, 1 - 1e-9)
    shifts = []
    # remove the heavy patient
    keep = ~heavy
    v2 = _without(val, keep)
    shifts.append(_utility_shift(sel, probs, val.labels, DPSelection.of(state, v2),
                                 probs[keep], v2.labels))  # fmt: skip
    # the heavy patient's predictions all the worst (the same V, a different model output)
    bad = np.where(heavy[:, None], worst, probs)
    shifts.append(_utility_shift(sel, probs, val.labels, sel, bad, val.labels))
    # the heavy patient's predictions NaN (a diverged model on those images)
    nan = np.where(heavy[:, None], np.nan, probs)
    shifts.append(_utility_shift(sel, probs, val.labels, sel, nan, val.labels))
    # one image removed (privacy unit image)
    keep1 = np.ones(len(val), bool)
    keep1[np.flatnonzero(heavy)[0]] = False
    v3 = _without(val, keep1)
    shifts.append(_utility_shift(sel, probs, val.labels, DPSelection.of(state, v3),
                                 probs[keep1], v3.labels))  # fmt: skip
    assert max(abs(s) for s in shifts) <= eps / 2 * (1 + 1e-9), (shifts, eps)
    assert max(abs(s) for s in shifts) > 0.1 * eps / 2  # the attack moved something


def test_a_diverged_epoch_scores_as_the_worst_and_never_nan():
    val = _val()
    sel = DPSelection.of(plan_state(1.0, 1e-5), val)
    nan = np.full(val.labels.shape, np.nan)
    g = np.random.default_rng(3)
    noisy = sel.noisy_utility(nan, val.labels, g)
    assert math.isfinite(noisy)
    # its utility is -(patients) * B: the minimum possible
    worst = sel.noisy_utility(nan, val.labels, np.random.default_rng(3)) - np.random.default_rng(
        3).gumbel()  # fmt: skip
    n_patients = len(np.unique(val.patient))
    assert worst * 2 * sel.bound / sel.noise.checkpoint_epsilon == pytest.approx(-n_patients)


@pytest.mark.parametrize("epsilon", [1.0, 8.0])
def test_selected_epoch_probability_ratio_of_neighbours_is_within_exp_epsilon(epsilon):
    """Empirical: the online running argmax (the real noisy_utility with OS-entropy-like
    independent draws per epoch) over 4 epochs on V and on V without the heavy patient,
    chosen adversarially (its loss is B at epoch 0 and 0 elsewhere). The estimated ratio of
    selection probabilities must stay below exp(eps) (allowing sampling error), and the
    running argmax must match the closed-form exponential mechanism."""
    val = _val(n_patients=20)
    heavy = val.patient == "heavy"
    keep = ~heavy
    v2 = _without(val, keep)
    state = plan_state(epsilon, 1e-5)
    s1, s2 = DPSelection.of(state, val), DPSelection.of(state, v2)
    eps = s1.noise.checkpoint_epsilon
    y = np.nan_to_num(val.labels)
    base = np.clip(np.where(y == 1, 0.6, 0.4), 0, 1)
    epochs = []
    for e in range(4):
        p = base.copy()
        target = np.where(y == 1, 1e-9, 1 - 1e-9) if e == 0 else np.where(y == 1, 1 - 1e-9, 1e-9)
        p[heavy] = target[heavy]
        epochs.append(p)

    # deterministic utilities (Gumbel from a fixed generator subtracted)
    def utilities(sel, split, mask):
        return np.array([sel.noisy_utility(p[mask], split.labels, np.random.default_rng(0))
                         - np.random.default_rng(0).gumbel() for p in epochs])  # fmt: skip

    u1 = utilities(s1, val, np.ones(len(val), bool))
    u2 = utilities(s2, v2, keep)
    exact1 = np.exp(u1 - u1.max()) / np.exp(u1 - u1.max()).sum()
    exact2 = np.exp(u2 - u2.max()) / np.exp(u2 - u2.max()).sum()
    assert np.max(np.abs(np.log(exact1 / exact2))) <= eps * (1 + 1e-9)
    n = 20000
    g = np.random.default_rng(11)
    picks1 = np.argmax(u1 + g.gumbel(size=(n, 4)), axis=1)
    picks2 = np.argmax(u2 + g.gumbel(size=(n, 4)), axis=1)
    f1 = np.bincount(picks1, minlength=4) / n
    f2 = np.bincount(picks2, minlength=4) / n
    assert np.allclose(f1, exact1, atol=0.015) and np.allclose(f2, exact2, atol=0.015)
    ok = (f1 > 0.02) & (f2 > 0.02)
    ratio = np.max(np.abs(np.log(f1[ok] / f2[ok])))
    assert ratio <= eps + 0.1, (ratio, eps)


# ------------------------------------------------------------------ attack 2: the thresholds


def test_histogram_sensitivity_of_a_patient_with_many_images_is_at_most_sqrt_labels():
    val = _val(heavy=60)
    codes = DPSelection.of(plan_state(1.0, 1e-5), val).codes
    probs = np.random.default_rng(2).random(val.labels.shape)
    heavy = val.patient == "heavy"  # the worst case: all its images in one bin, all positive
    probs[heavy] = 0.55
    val.labels[heavy] = 1.0
    pos, neg = releases.histogram_statistic(probs, val.labels, codes)
    keep = ~heavy
    v2 = _without(val, keep)
    codes2 = DPSelection.of(plan_state(1.0, 1e-5), v2).codes
    pos2, neg2 = releases.histogram_statistic(probs[keep], v2.labels, codes2)
    l2 = math.sqrt(((pos - pos2) ** 2).sum() + ((neg - neg2) ** 2).sum())
    assert 0.99 * math.sqrt(N_LABELS) < l2 <= math.sqrt(N_LABELS) * (1 + 1e-9)
    # per label: L2 <= 1
    per_label = np.sqrt(((pos - pos2) ** 2).sum(1) + ((neg - neg2) ** 2).sum(1))
    assert (per_label <= 1 + 1e-9).all()


def test_the_histogram_noise_drawn_is_the_ledgers_sigma_times_sqrt_labels():
    val = _val()
    sel = DPSelection.of(plan_state(1.0, 1e-5), val)
    probs = np.random.default_rng(2).random(val.labels.shape)
    pos, neg = releases.histogram_statistic(probs, val.labels, sel.codes, sel.bins)
    draws = []
    for i in range(200):
        r = releases.release_thresholds(probs, val.labels, sel.codes,
                                        sel.noise.histogram_noise_multiplier, sel.bins,
                                        np.random.default_rng(i))  # fmt: skip
        draws.append(np.r_[(r.hist_pos - pos).ravel(), (r.hist_neg - neg).ravel()])
    std = float(np.std(np.concatenate(draws)))
    want = sel.noise.histogram_noise_multiplier * math.sqrt(N_LABELS)
    assert std == pytest.approx(want, rel=0.03)
    entry = sel.entry(1e-5, N_LABELS)
    assert entry["noise"]["histogram_noise_multiplier"] == sel.noise.histogram_noise_multiplier


def test_nan_scores_give_thresholds_without_error():
    val = _val()
    sel = DPSelection.of(plan_state(1.0, 1e-5), val)
    t = sel.thresholds(np.full(val.labels.shape, np.nan), val.labels)
    assert len(t) == N_LABELS


# ------------------------------------------------------------------ attack 3: the calibration


@pytest.mark.parametrize("delta", [1e-3, 1e-5, 1e-8])
@pytest.mark.parametrize("epsilon", [0.1, 0.3, 1.0, 3.0, 8.0, 20.0, 50.0])
def test_the_validation_releases_own_epsilon_never_exceeds_the_training_epsilon(epsilon, delta):
    noise = validation_noise(epsilon, delta)
    assert validation_epsilon(noise, delta) <= epsilon * (1 + 1e-9)
    entry = validation_entry(noise, epsilon_train=epsilon, delta=delta, bound=1.0, bins=20,
                             n_labels=N_LABELS)  # fmt: skip
    assert check_validation(entry, epsilon_train=epsilon, epsilon_spent=epsilon, delta=delta,
                            n_labels=N_LABELS) == []  # fmt: skip


def test_the_validation_split_of_a_patient_depends_only_on_its_id_and_the_salt():
    """Parallel composition needs a split independent of the data: a patient's side does not
    move when other patients are added or removed."""
    from privdom_ray.manifest import carve_val

    ids = [f"pt{i}" for i in range(2000)]
    full = carve_val(ids, salt="s")
    half = carve_val(ids[::2], salt="s")
    assert half == {p for p in full if p in set(ids[::2])}
    assert 100 < len(full) < 300


# ------------------------------------------------------------- attack 4: audit and guarantee


@pytest.mark.parametrize(
    "edit",
    [
        {"n_labels": 1},  # a smaller L2 sensitivity claimed
        {"bins": 5},
        {"bound": 0.1},
        {"epsilon": 0.0},
        {"accountant": "pld"},
    ],
)
def test_check_validation_flags_edited_parameters(edit):
    noise = validation_noise(1.0, 1e-5)
    entry = validation_entry(noise, epsilon_train=1.0, delta=1e-5, bound=1.0, bins=20,
                             n_labels=N_LABELS)  # fmt: skip
    ok = dict(epsilon_train=1.0, epsilon_spent=1.0, delta=1e-5, n_labels=N_LABELS)
    assert check_validation({**entry, **edit}, **ok)


def _release(trial: str, entry) -> Release:
    return Release(trial, "a", 1e-5, "patient", (), validation=entry)


def test_a_sites_validation_composition_counts_every_trial_and_grows():
    noise = validation_noise(1.0, 1e-5)
    entry = validation_entry(noise, epsilon_train=1.0, delta=1e-5, bound=1.0, bins=20,
                             n_labels=N_LABELS)  # fmt: skip
    one = compose_validation([_release("t0", entry)], 1e-5)
    four = compose_validation([_release(f"t{i}", entry) for i in range(4)], 1e-5)
    assert one == pytest.approx(validation_epsilon(noise, 1e-5))
    assert four > 1.5 * one
    # the entry's stored "epsilon" is not what composes: lowering it changes nothing
    low = {**entry, "epsilon": 0.0}
    assert compose_validation([_release(f"t{i}", low) for i in range(4)], 1e-5) == four


def _train_cell(tmp_path, epsilon):
    from test_dp_selection import _train_cell as train

    return train(tmp_path, epsilon)


def _problems(store, key, edit=None):
    from test_dp_selection import _problems as problems

    return problems(store, key, edit)


@pytest.mark.slow
def test_audit_flags_tampered_validation_entries_and_a_dp_record_without_its_entry(
    tmp_path, one_torch_thread
):
    """Tamper the ledger's validation entry through the store's own rewrite (seals valid).
    Every edit that lowers the cost must fail audit. Dropping the entry of a trial whose
    trial.json says its epoch and thresholds are DP releases must fail too: otherwise the
    site's guarantee silently omits that trial's validation releases while the record still
    claims them inside epsilon."""
    spec, store = _train_cell(tmp_path, 2.0)
    assert _problems(store, spec.key) == []

    def edit(**fields):
        return lambda d: {**d, "validation": {**d["validation"], **fields}}

    def noise(name, scale):
        def f(d):
            v = d["validation"]
            return {
                **d,
                "validation": {**v, "noise": {**v["noise"], name: v["noise"][name] * scale}},
            }

        return f

    for name, tamper in (
        ("n_labels", edit(n_labels=1)),
        ("bins", edit(bins=5)),
        ("bound", edit(bound=0.1)),
        ("epsilon", edit(epsilon=0.01)),
        ("histogram_noise_multiplier", noise("histogram_noise_multiplier", 0.9)),
        ("checkpoint_epsilon", noise("checkpoint_epsilon", 1.1)),
        ("checkpoint_epsilon", noise("checkpoint_epsilon", 0.5)),  # more noise claimed: lowers
    ):  # the site's guarantee, so it must fail too
        found = _problems(store, spec.key, tamper)
        assert found, f"audit accepts an edited {name}"
    trial_json = json.loads((store.folder(spec.key) / "trial.json").read_text())
    assert "exponential" in trial_json["selection"]  # the record claims DP releases
    dropped = _problems(
        store, spec.key, lambda d: {k: v for k, v in d.items() if k != "validation"}
    )
    assert dropped, (
        "BREAK: audit accepts a DP trial whose trial.json claims DP epoch/threshold releases "
        "but whose ledger has no validation entry (the site guarantee then omits them)"
    )


@pytest.mark.slow
def test_audit_flags_a_validation_entry_on_a_trial_whose_record_says_exact_selection(
    tmp_path, one_torch_thread
):
    """The reverse inconsistency: a sealed DP trial whose trial.json says its epoch and
    thresholds were chosen EXACTLY (as a trial finished before this release says, with its
    exact val_macro_auc) while its ledger carries a well-formed validation entry (store's
    own rewrite, seals valid). Export labels epoch and thresholds "inside epsilon" from the
    entry alone; audit must refuse the contradiction."""
    from privdom_ray.audit import audit_trial
    from privdom_ray.selection.untuned import EXACT_SELECTION

    spec, store = _train_cell(tmp_path, 2.0)
    assert _problems(store, spec.key) == []
    doc = json.loads(store.verified_bytes(spec.key, "trial.json"))
    assert "exponential" in doc["selection"]
    exact = {**doc, "selection": EXACT_SELECTION, "val_macro_auc": 0.8}
    store.rewrite(spec.key, "trial.json", json.dumps(exact).encode())
    record = store.read(spec.key)
    assert record.ledger.validation is not None and record.info.val_macro_auc == 0.8
    bad = [line.problem for line in audit_trial(store, record) if not line.ok]
    assert bad, (
        "BREAK: audit accepts a validation entry on a trial whose record says its epoch and "
        "thresholds were selected exactly (export then labels them inside epsilon)"
    )


@pytest.mark.parametrize("epsilon", [1.0, 8.0, 50.0])
def test_the_epoch_releases_exact_renyi_divergence_is_within_its_ledger_curve(epsilon):
    """Worst-case neighbours of the epoch choice (one patient's clipped loss moves from 0 to B
    in some epochs and from B to 0 in others: replace-one, the widest range) over 2..10 epochs:
    the exact Renyi divergence of the two selection distributions never exceeds the curve the
    ledger composes (rdp.exponential_rdp of the entry's checkpoint epsilon)."""
    from privdom_ray.selection import rdp

    eps = validation_noise(epsilon, 1e-5).checkpoint_epsilon
    orders = rdp.as_orders()
    curve = rdp.exponential_rdp(eps, orders)
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 10):
        for _ in range(50):
            u = rng.uniform(-5, 0, n)
            shift = rng.choice([-1.0, 1.0], n)
            for v in (u + shift, u + np.maximum(shift, 0)):  # replace-one, add/remove
                p = np.exp(eps * u / 2) / np.exp(eps * u / 2).sum()
                q = np.exp(eps * v / 2) / np.exp(eps * v / 2).sum()
                for a, bound in zip(orders, curve, strict=True):
                    for x, y in ((p, q), (q, p)):
                        t = a * np.log(x) + (1 - a) * np.log(y)  # log-sum-exp: no overflow
                        d = (t.max() + np.log(np.exp(t - t.max()).sum())) / (a - 1)
                        assert d <= bound * (1 + 1e-9) + 1e-12, (n, a, d, bound)
