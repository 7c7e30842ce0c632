"""A trial of a kind this version does not register (a newer privdom-ray's, or a record edited
and resealed) is a named error in every certifying command, never a bare KeyError and never
damage: its folder stays where it is, for the version that knows it."""

from __future__ import annotations

import math
import shutil

import pandas as pd
import pytest
from helpers import folders, trials

import launch
from privdom_ray import kinds
from privdom_ray.audit import audit_output
from privdom_ray.export import ExportRefused, export
from privdom_ray.folder import Plan, PlannedCell, PlannedTarget, SweepFolder
from privdom_ray.kinds import UnknownKind
from privdom_ray.stats import results, study
from privdom_ray.store import TrialStore

NAMED = "unknown trial kind 'foo'"


@pytest.fixture(scope="module")
def newer(tmp_path_factory):
    """A finished sweep of this version (tables written) plus a trial whose trial.json says
    variant "foo", resealed and under the key its spec hashes to: what a newer version with
    a kind "foo" leaves in the folder; the plan lists it, as that version's plan would."""
    out = tmp_path_factory.mktemp("newer")
    # non-private trials: no ledger to recompute, so the unknown kind is the audit's one problem
    keys = trials.build_output(out, domains=("a", "b"), epsilons=(math.inf,), n=60)
    results.aggregate(out, keys, "t")
    new = folders.clone_trial(out, keys[0], variant="foo")
    targets = tuple(PlannedTarget(d, f"fp{d}") for d in ("a", "b"))
    cells = tuple(PlannedCell(k, folders.record(out, k).spec.name) for k in [*keys, new])
    SweepFolder(out).write_plan(Plan(sweep="t", cells=cells, targets=targets))
    return out, keys, new


def _untouched(out, new) -> None:
    """Not damage: the folder is where it was, whole, and nothing was set aside."""
    store = TrialStore(out)
    assert store.folder(new).is_dir() and store.read(new).spec.variant == "foo"
    assert not (out / "set_aside").exists() or not any((out / "set_aside").iterdir())


def test_an_unknown_kind_is_a_named_lookup_error_not_a_key_error(newer):
    out, _, new = newer
    spec = folders.record(out, new).spec
    with pytest.raises(UnknownKind) as info:
        kinds.kind_of(spec)
    exc = info.value
    assert isinstance(exc, LookupError) and not isinstance(exc, KeyError)
    assert (exc.kind, exc.key) == ("foo", new)
    message = str(exc)
    assert NAMED in message and new in message and spec.name in message
    assert "newer privdom-ray" in message and f"move trials/{new} aside" in message
    with pytest.raises(UnknownKind, match="a table row of source 'a'"):
        kinds.row_kind("foo", "a", "a")
    assert kinds.row_kind("clip_only", "a", "a").name == "clip_only"


def test_audit_lists_the_unknown_trial_as_a_problem_and_fails(newer, capsys):
    out, keys, new = newer
    bad = [line for line in audit_output(out) if not line.ok]
    assert [line.key for line in bad] == [new[:12]]
    assert NAMED in bad[0].problem and f"trials/{new}" in bad[0].problem
    assert launch.main(["audit", str(out)]) == 1
    assert NAMED in capsys.readouterr().out
    _untouched(out, new)
    # an edited trial.json, resealed in place (its spec no longer hashes to its folder)
    edit = lambda i: {**i, "spec": {**i["spec"], "variant": "foo"}}  # noqa: E731
    with folders.rewritten(out, keys[1], "trial.json", edit):
        bad = {line.key: line.problem for line in audit_output(out) if not line.ok}
    assert set(bad) == {new[:12], keys[1][:12]} and NAMED in bad[keys[1][:12]]
    assert f"trials/{keys[1]}" in bad[keys[1][:12]]


def test_status_names_the_unknown_trial(newer, capsys):
    out, keys, new = newer
    store = TrialStore(out)
    state, detail = store.status(new, [])
    assert state == "unknown" and NAMED in detail
    assert store.status(keys[0], [])[0] == "done"
    assert launch.main(["status", str(out), "--quick"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if new in line]
    assert len(lines) == 1 and lines[0].startswith("unknown") and NAMED in lines[0]
    _untouched(out, new)


def test_aggregation_stops_with_the_named_error(newer):
    out, keys, new = newer
    before = (out / "transfer.parquet").read_bytes()
    with pytest.raises(UnknownKind, match=NAMED):
        results.aggregate(out, [*keys, new], "t")
    with pytest.raises(UnknownKind, match=NAMED):
        study.load_study(out, [*keys, new])
    assert (out / "transfer.parquet").read_bytes() == before  # the tables stand


def test_report_of_a_table_with_an_unknown_kind_stops_with_the_named_error(newer, tmp_path, capsys):
    out, _, _ = newer
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    table = pd.read_parquet(copy / "transfer.parquet")
    table.loc[table.index[0], "variant"] = "foo"  # a newer version's row
    table.to_parquet(copy / "transfer.parquet")
    assert launch.main(["report", str(copy)]) == 2
    assert NAMED in capsys.readouterr().err


def test_export_refuses_with_the_named_error(newer, tmp_path):
    out, _, new = newer
    dest = tmp_path / "dest"
    with pytest.raises(ExportRefused, match=NAMED) as info:
        export(out, dest)
    assert new[:12] in str(info.value) and "finds 1 problem(s)" in str(info.value)
    assert not dest.exists()
    _untouched(out, new)
