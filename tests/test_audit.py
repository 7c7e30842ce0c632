"""``launch.py audit`` recomputes every DP ledger from its trial's spec and names each field
that was tampered with. Real finished trials (real Opacus, real files: conftest's
``real_output``), a single-site cell, its audit twin and both sites of a federation."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from conftest import launch, launch_here
from helpers import folders

from privdom_ray import privacy
from privdom_ray.audit import audit_trial
from privdom_ray.store import DamagedRecord, TrialStore

pytestmark = pytest.mark.slow  # the session's real output takes about a minute to train

LEDGER_FIELDS = [f.name for f in dataclasses.fields(privacy.Ledger)]


def tampered(value):
    """A different value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1 if value else 7
    if isinstance(value, float):
        return value * 1.5 if value else 0.25
    if isinstance(value, str):
        return value + "x" if value else "site_z"
    if isinstance(value, list):  # the released (noised) loss weights: an impossible release
        return [-1.0] * len(value)
    if isinstance(value, dict) and "noise" in value:  # validation releases: less noise claimed
        return {**value, "noise": {k: tampered(v) if v else v for k, v in value["noise"].items()}}
    raise TypeError(value)


def problems(store: TrialStore, key: str, ledger: dict, site: str) -> str:
    """The audit's problems for the trial ``key`` with ``ledger`` written in place of its
    ledger.json (or of the federation site ``site``'s), resealed as a faulty writer would
    (the audit reads the stored document, never a typed copy); put back afterwards."""
    original = store.verified_bytes(key, "ledger.json")
    document = store.ledger_document(key)
    if site:
        ledger = {**document, "sites": {**document["sites"], site: ledger}}
    store.rewrite(key, "ledger.json", json.dumps(ledger).encode())
    try:
        lines = audit_trial(store, store.read(key))
    except DamagedRecord as exc:  # not even a ledger: the typed read names it, voids the trial
        return f"damaged: {exc.path.name}: {exc.reason}"
    finally:
        store.rewrite(key, "ledger.json", original)
    return " | ".join(f"{line.site}: {line.problem}" for line in lines if not line.ok)


def cases(store: TrialStore, names: dict[str, str]):
    """(label, key, site, the stored ledger) of every DP ledger of the real output."""
    for name in ("a_eps2_seed0", "a_eps2_seed0_audit", "fed_ab_eps2_seed0"):
        ledger = folders.ledger(store.output, names[name])
        sites = list(ledger.get("sites", {})) or [""]
        for site in sites:
            yield f"{name}/{site}", names[name], site, (ledger["sites"][site] if site else ledger)


def test_the_untouched_output_passes_the_audit(real_output):
    output, names = real_output
    store = TrialStore(output)
    for key in names.values():
        record = folders.record(output, key)
        assert [line.problem for line in audit_trial(store, record) if not line.ok] == []


def test_tampering_with_any_ledger_field_is_caught_and_named(real_output, tmp_path):
    """Edits ledgers in place (each put back): on a copy, since real_output is shared with
    the other xdist worker's modules, which read it meanwhile."""
    output, names = real_output
    output = shutil.copytree(output, tmp_path / "out")
    store = TrialStore(output)
    seen = 0
    for label, key, site, ledger in cases(store, names):
        for field in LEDGER_FIELDS:
            if field not in ledger:  # selection: tuned cells only; validation: DP cells' own
                continue
            bad = {**ledger, field: tampered(ledger[field])} if field != "mechanisms" else None
            if bad is None:
                continue
            found = problems(store, key, bad, site)
            assert field in found, (label, field, found)
            seen += 1
        for i, mech in enumerate(ledger["mechanisms"]):
            for param in ("noise_multiplier", "sample_rate", "steps"):
                mechs = [dict(m) for m in ledger["mechanisms"]]
                mechs[i][param] = tampered(mech[param])
                found = problems(store, key, {**ledger, "mechanisms": mechs}, site)
                assert f"mechanisms[{mech['name']}].{param}" in found, (label, param, found)
                seen += 1
            dropped = [m for j, m in enumerate(ledger["mechanisms"]) if j != i]
            assert "mechanisms" in problems(store, key, {**ledger, "mechanisms": dropped}, site)
        missing = {k: v for k, v in ledger.items() if k != "noise_multiplier"}
        assert "noise_multiplier missing" in problems(store, key, missing, site)
    names_seen = {label.split("/")[0] for label, *_ in cases(store, names)}
    assert names_seen == {"a_eps2_seed0", "a_eps2_seed0_audit", "fed_ab_eps2_seed0"}
    # 4 ledgers, 2 mechanisms each; the DP cell's own ledger has its validation releases
    assert seen == 4 * (len(LEDGER_FIELDS) - 3 + 2 * 3) + 1


def test_the_attacks_that_passed_before_are_caught_from_the_command_line(real_output, tmp_path):
    """The issue's attacks, on a copy of the output folder: sigma raised to 4 with
    epsilon_spent recomputed to match (the model card would have said 0.84 for weights trained
    at 1.99), the count release's steps set to 0, its sigma x100; and the history's epsilon."""
    output, names = real_output
    work = tmp_path / "w"
    shutil.copytree(output, work / "out")
    out, key = work / "out", names["a_eps2_seed0"]
    original = folders.ledger(out, key)

    def consistent(ledger: dict) -> dict:  # the epsilon its own mechanisms give
        mechs = privacy.ledger_mechanisms(ledger)
        eps, _ = privacy.epsilon_of(ledger["accountant"], mechs, ledger["delta"])
        rdp, _ = privacy.epsilon_of("rdp", mechs, ledger["delta"])
        return {**ledger, "epsilon_spent": eps, "epsilon_rdp": rdp}

    def with_mechanism(name: str, **changes) -> dict:
        mechs = [{**m, **changes} if m["name"] == name else m for m in original["mechanisms"]]
        return {**original, "mechanisms": mechs, **(
            {"noise_multiplier": changes["noise_multiplier"]}
            if name == "dp_sgd" and "noise_multiplier" in changes else {})}  # fmt: skip

    counts = next(m for m in original["mechanisms"] if m["name"] == "label_counts")
    attacks = {
        "noise_multiplier": consistent(with_mechanism("dp_sgd", noise_multiplier=4.0)),
        "mechanisms[label_counts].steps": consistent(with_mechanism("label_counts", steps=0)),
        "mechanisms[label_counts].noise_multiplier": consistent(
            with_mechanism("label_counts", noise_multiplier=100 * counts["noise_multiplier"])
        ),
    }
    assert attacks["noise_multiplier"]["epsilon_spent"] < 0.6 * original["epsilon_spent"]
    assert launch("audit", "out", cwd=work).returncode == 0  # the script, as a user runs it
    # the same main() in this process from here on: torch and the calibrations imported and
    # computed once, not in each of ten fresh interpreters (each edit is audited afresh)
    # each edit resealed: the checksums guard against damage, not against someone who can
    # write the folder
    for field, ledger in attacks.items():
        with folders.rewritten(out, key, "ledger.json", lambda _, new=ledger: new):
            proc = launch_here("audit", "out", cwd=work, expect=1)
            assert field in proc.stdout, (field, proc.stdout[-2000:])
            refused = launch_here("export", "out", "--to", "shared", cwd=work, expect=1)
            assert "refusing" in refused.stderr
    # a model trained without DP whose ledger claims a guarantee
    claims_dp = {**original, "initialization": "scratch"}
    with folders.rewritten(out, names["a_epsinf_seed0"], "ledger.json", lambda _: claims_dp):
        assert "trained without DP" in launch_here("audit", "out", cwd=work, expect=1).stdout
    # the recorded training-set size against a recount of the cache entry's rows
    with folders.rewritten(out, key, "trial.json", lambda i: {**i, "units": i["units"] + 40}):
        assert "units: the trial record says" in launch_here("audit", "out", cwd=work, expect=1).stdout

    def halve_last_epsilon(history: list) -> list:
        history[-1]["epsilon"] *= 0.5
        return history

    folders.rewrite_record(out, key, "history.json", halve_last_epsilon)
    assert "history's last epsilon" in launch_here("audit", "out", cwd=work, expect=1).stdout
