"""``launch.py export`` on a real finished output (conftest's ``real_output``: real Opacus, real
files): every column of every exported file with its privacy class, one stated epsilon per
training set that a PLD recomputation reproduces (with and without ``--with-audit``), rows
without a guarantee marked, and the refusals (failed audit, damaged file, destination inside
the output folder, models without exported rows)."""

from __future__ import annotations

import json
import math
import shutil

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import launch_here as launch  # in-process: ~5 CPU s less per command
from helpers import folders

from privdom_ray.stats.results import PRIVACY_CLASSES
from privdom_ray.store import TrialStore

pytestmark = pytest.mark.slow  # the session's real output takes about a minute to train

_TRANSFER_TEST = (
    "label subgroup n n_pos n_patients resampling_unit n_labels ci_df auc auc_lo auc_hi "
    "accuracy accuracy_lo accuracy_hi sensitivity sensitivity_lo sensitivity_hi specificity "
    "specificity_lo specificity_hi brier brier_lo brier_hi ece ece_lo ece_hi null_reason ci_note "
    "oracle_threshold oracle_accuracy oracle_sensitivity oracle_specificity"
)
#: Every column of every exported parquet file, by privacy class (the default export).
EXPORTED = {
    "transfer.parquet": {
        "public": "sweep source target on_domain training_sites seed model variant init n_boot "
        "image_size epochs logical_batch lr eval_seconds node versions tuning",
        "release_id": "trial_key",
        "ledger": "epsilon_target epsilon_spent epsilon_rdp delta noise_multiplier sample_rate "
        "steps max_grad_norm accountant privacy_unit privacy_scope loss_weights "
        "epsilon_validation guarantee epsilon_release epsilon_training_set",
        "test": _TRANSFER_TEST,
        "validation": "threshold best_epoch",
    },
    "comparisons.parquet": {
        "public": "comparison quantity endpoint is_summary test model source target on_domain "
        "seed n_seeds label subgroup resampling_unit n_off q_family worse_if margin n_sites ci",
        "ledger": "epsilon epsilon_spent accountant guarantee",
        "test": "n n_pos n_patients n_labels value_dp value_dp_lo value_dp_hi sd_dp",
        "nondp": "value_nondp value_nondp_lo value_nondp_hi auc_on auc_off_mean auc_off_lo "
        "auc_off_hi delta delta_lo delta_hi df p_value q_value tost_lo tost_hi margin_confirmable "
        "tost_half_width p_tost q_tost p_tost_holm p_tost_iut p_noninf q_noninf p_value_holm "
        "p_noninf_holm verdict t_stat p_t sd_nondp delta_sd null_reason",
    },
    "reliability.parquet": {
        "public": "model source target on_domain seed label bin bin_lo bin_hi",
        "ledger": "epsilon guarantee",
        "test": "n mean_score observed",
    },
    "guarantees.parquet": {
        "public": "training_site",
        "ledger": "privacy_unit delta dp_models epsilon_models audit_twins epsilon_with_audit "
        "audit_included epsilon non_dp_models accountant statement",
    },
}
AUDIT = "audit_epsilon_lower audit_epsilon_lower_replay audit_epsilon_max audit_power_noise_scale "
AUDIT += "audit_noise_ratio audit_noise_check audit_canaries audit_guesses audit_correct "
AUDIT += "audit_kind audit_twin_epsilon"


@pytest.fixture(scope="module")
def exports(real_output, tmp_path_factory):
    """The default export and the --with-audit one, through the command line."""
    output, names = real_output
    work = output.parent
    out = {}
    for flag in ("", "--with-audit"):
        dest = tmp_path_factory.mktemp("export") / "shared"
        proc = launch("export", "out", "--to", str(dest), *([flag] if flag else []), cwd=work)
        assert "exported" in proc.stdout
        out[flag or "default"] = dest
    return output, names, out


def classes_of(path) -> dict[str, str]:
    by_class: dict[str, list[str]] = {}
    for field in pq.read_schema(path):
        by_class.setdefault(field.metadata[b"privacy"].decode(), []).append(field.name)
    return {cls: " ".join(cols) for cls, cols in by_class.items()}


def test_every_column_of_every_exported_file_has_its_privacy_class(exports):
    _, _, dest = exports
    for which, folder in dest.items():
        files = sorted(p.name for p in folder.glob("*.parquet"))
        assert files == sorted(EXPORTED), which
        for name, expected in EXPORTED.items():
            want = dict(expected)
            if name == "transfer.parquet" and which == "--with-audit":
                want["audit"] = AUDIT
            assert classes_of(folder / name) == want, (which, name)
            assert set(want) <= set(PRIVACY_CLASSES)
    # the home-only classes never leave, whatever the flags
    home = pq.read_schema(exports[0] / "transfer.parquet").names
    for gone in ("mia_auc", "mia_tpr_at_1fpr", "train_seconds", "data_fingerprint"):
        assert gone in home and not any(
            gone in classes_of(f / "transfer.parquet").get(c, "")
            for f in dest.values()
            for c in PRIVACY_CLASSES
        )


def validation_epsilon(ledger: dict, delta: float) -> float:
    """A ledger's validation releases (the DP epoch and thresholds), from their stored noise:
    0 without the entry (a model that chose exactly)."""
    from privdom_ray.selection import rdp
    from privdom_ray.selection.tuning import ValidationNoise

    entry = ledger.get("validation")
    if entry is None:
        return 0.0
    return float(rdp.rdp_to_epsilon(ValidationNoise(**entry["noise"]).rdp(), delta)[0])


def pld(mechanisms: list[dict], delta: float) -> float:
    """Google's PLD accountant straight from the ledgers' numbers (not through privdom_ray)."""
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    for m in mechanisms:
        if m["steps"] == 0:
            continue
        gauss = dp_event.GaussianDpEvent(m["noise_multiplier"])
        q = m["sample_rate"]
        acc.compose(gauss if q == 1 else dp_event.PoissonSampledDpEvent(q, gauss), m["steps"])
    return acc.get_epsilon(delta)


def site_mechanisms(ledger: dict, site: str) -> list[dict]:
    ledgers = ledger.get("sites") or {ledger.get("site") or "a": ledger}
    return list(ledgers.get(site, {}).get("mechanisms", []))


def test_each_cards_epsilon_is_a_pld_recomputation_of_everything_exported_from_its_site(exports):
    """Site a's training images are in the epsilon-2 model, the federation (a's ledger) and,
    with --with-audit, the audit twin: the card's epsilon for a composes exactly those; site b
    only the federation. The default export's per-model epsilon is the model's alone."""
    output, names, dest = exports
    twin = folders.ledger(output, names["a_eps2_seed0_audit"])
    for which, folder in dest.items():
        cards = {p.parent.name.rsplit("-", 1)[0]: json.loads(p.read_text())
                 for p in folder.glob("models/*/card.json")}  # fmt: skip
        ledgers = [json.loads(p.read_text()) for p in folder.glob("models/*/ledger.json")]
        assert sorted(cards) == ["a_eps2_seed0", "fed_ab_eps2_seed0"]  # no non-DP weights
        for site in ("a", "b"):
            mechs = [m for led in ledgers for m in site_mechanisms(led, site)]
            if which == "--with-audit" and site == "a":
                mechs += twin["mechanisms"]
            independent = pld(mechs, 1e-5)
            for card in cards.values():
                if site in card["training_sets"]:
                    stated = card["training_sets"][site]
                    assert stated["epsilon"] == pytest.approx(independent, rel=2e-3), (which, site)
                    assert stated["accountant"] == "pld" and stated["delta"] == 1e-5
        model = folders.ledger(output, names["a_eps2_seed0"])
        # the model's own releases: its training (PLD) and, in parallel on the validation
        # split, its DP epoch and threshold releases (RDP): the larger applies
        alone = max(pld(model["mechanisms"], 1e-5), validation_epsilon(model, 1e-5))
        release = cards["a_eps2_seed0"]["epsilon_release"]
        if which == "default":
            assert release == pytest.approx(alone, rel=2e-3)  # the model's own epsilon
        else:
            both = pld(model["mechanisms"] + twin["mechanisms"], 1e-5)
            assert release == pytest.approx(both, rel=2e-3) and both > 1.2 * alone
        table = pd.read_parquet(folder / "guarantees.parquet").set_index("training_site")
        assert bool(table.loc["a", "audit_included"]) == (which == "--with-audit")
        assert table.loc["a", "non_dp_models"] == 1 and "none for the set" in table.loc[
            "a", "statement"]  # fmt: skip
        assert table.loc["b", "statement"].startswith("(")  # b: only DP releases


def test_rows_without_a_guarantee_are_marked_and_the_report_states_each_training_set(exports):
    _, _, dest = exports
    for which, folder in dest.items():
        df = pd.read_parquet(folder / "transfer.parquet")
        nondp = df["epsilon_target"].map(math.isinf)
        assert (df.loc[nondp, "guarantee"] == "no guarantee: trained without DP").all()
        assert df.loc[nondp, "epsilon_release"].map(math.isinf).all()
        assert df.loc[~nondp, "guarantee"].str.contains("-DP for each training image").all()
        cmp = pd.read_parquet(folder / "comparisons.parquet")
        assert (cmp.loc[cmp["epsilon"].map(math.isinf), "guarantee"]
                == "no guarantee: trained without DP").all()  # fmt: skip
        report = (folder / "report.md").read_text()
        assert "One guarantee per training set" in report
        for row in pd.read_parquet(folder / "guarantees.parquet").itertuples():
            assert f"- **{row.training_site}**: {row.statement}" in report
        assert "no guarantee: trained without DP" in report
        assert ("Canary audit" in report) == (which == "--with-audit")
        note = (folder / "PRIVACY.md").read_text()
        assert "One guarantee per training set" in note and "a_epsinf_seed0" in note


def test_export_refuses_damage_a_failed_audit_and_a_destination_inside(real_output, tmp_path):
    output, names = real_output
    work = tmp_path / "w"
    shutil.copytree(output, work / "out")
    inside = launch("export", "out", "--to", "out/shared", cwd=work, expect=2)
    assert "inside the output folder" in inside.stderr
    # a model trained on old data (its key is in no exported row) stays home
    store = TrialStore(work / "out")
    old_data = folders.clone_trial(work / "out", names["a_eps2_seed0"], data_fingerprint="fp-a-old")
    launch("export", "out", "--to", "shared", cwd=work)
    copied = [p.name.rsplit("-", 1)[1] for p in (work / "shared" / "models").iterdir()]
    assert store.release_id(old_data) not in copied and len(copied) == 2
    # a damaged comparisons table: exit 1, naming the file, nothing written
    cmp = work / "out" / "comparisons.parquet"
    data = cmp.read_bytes()
    cmp.write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))
    bad = launch("export", "out", "--to", "shared2", cwd=work, expect=1)
    assert "comparisons.parquet" in bad.stderr and not (work / "shared2").exists()
    cmp.write_bytes(data)
    # a model whose weights are damaged (fault injection: the file itself)
    model = store.model_path(names["fed_ab_eps2_seed0"])
    weights = model.read_bytes()
    model.write_bytes(weights[:100] + bytes(200) + weights[300:])
    bad = launch("export", "out", "--to", "shared3", cwd=work, expect=1)
    assert "model.pt" in bad.stderr and not (work / "shared3").exists()


def test_export_recomputes_what_the_tables_claim_instead_of_trusting_them(real_output, tmp_path):
    """The attacks of the issue-22 review that `audit` alone let through: a transfer table
    edited without resealing, one edited and resealed to contradict the ledgers, a table with
    rows of a model the transfer table lacks, a spec edited with a matching ledger, and an
    audit twin gone under --with-audit (its columns must not leave uncovered)."""
    import pyarrow as pa

    from privdom_ray import integrity
    from privdom_ray.folder import TABLES

    output, names = real_output
    work = tmp_path / "w"
    shutil.copytree(output, work / "out")
    out = work / "out"
    transfer = pq.read_table(out / "transfer.parquet")
    sigma = pa.array([50.0] * len(transfer), pa.float64())
    edited = transfer.set_column(transfer.schema.get_field_index("noise_multiplier"),
                                 transfer.schema.field("noise_multiplier"), sigma)  # fmt: skip
    pq.write_table(edited, out / "transfer.parquet")
    bad = launch("export", "out", "--to", "s1", cwd=work, expect=1)
    assert "transfer.parquet" in bad.stderr and "outputs.json" not in bad.stderr.split(":")[0]
    integrity.seal_files(out, list(TABLES))  # resealed: now it contradicts
    bad = launch("export", "out", "--to", "s2", cwd=work, expect=1)
    assert "noise_multiplier is 50.0, its ledger says" in bad.stderr
    pq.write_table(transfer, out / "transfer.parquet")
    fed = pc_filter(transfer, "source", "fed_ab")
    pq.write_table(fed, out / "transfer.parquet")
    integrity.seal_files(out, list(TABLES))
    bad = launch("export", "out", "--to", "s3", cwd=work, expect=1)
    assert "has rows of the model fed_ab" in bad.stderr and "no rows in transfer" in bad.stderr
    pq.write_table(transfer, out / "transfer.parquet")
    integrity.seal_files(out, list(TABLES))
    # the twin set aside: --with-audit ships no audit column it cannot cover
    store = TrialStore(out)
    store.set_aside(names["a_eps2_seed0_audit"], "a test")
    launch("export", "out", "--to", "s4", "--with-audit", cwd=work)
    shared = pd.read_parquet(work / "s4" / "transfer.parquet")
    assert shared["audit_epsilon_lower"].isna().all()
    assert pd.read_parquet(work / "s4" / "guarantees.parquet")["audit_twins"].sum() == 0
    assert b"pandas" not in (pq.read_schema(work / "s4" / "transfer.parquet").metadata or {})
    # a spec edited after training, its ledger rebuilt to match: the key no longer matches
    folders.rewrite_record(out, names["a_eps2_seed0"], "trial.json",
                           lambda info: {**info, "spec": {**info["spec"], "epsilon": "1"}})  # fmt: skip
    bad = launch("audit", "out", cwd=work, expect=1)
    assert "spec hashes to" in bad.stdout and "edited after training" in bad.stdout


def pc_filter(table, column: str, drop: str):
    import pyarrow.compute as pc

    return table.filter(pc.not_equal(table.column(column), drop))
