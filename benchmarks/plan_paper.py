"""``launch.py plan`` for the paper's grid at its real sizes, without the datasets.

Why: the paper's five sites are not downloadable here, so ``launch.py plan
experiments/paper.yaml`` cannot read their manifests. This script plans the same grid (the
committed ``experiments/paper.yaml``: 5 sites x epsilons {1, 3, 6, 10, inf} x 3 seeds, 80
epochs at 512 px, a MIMIC pretraining, one audit twin per epsilon) with the split sizes the
paper reports (``shared/reference/paper.md``; validation = 10% of training patients, carved
from training as our adapters do) through the real planner and cost model
(``kinds.plan_trials``, ``costs.estimate``/``render``), then sets the compute time against the
goal: the full grid in under 24 hours on one 8-GPU node.

The rates are assumptions, stated on the command line (images per second of one trial slot,
plain and DP; a slot is a fraction of a GPU, ``--slots`` of them run at once)::

    uv run python benchmarks/plan_paper.py                        # the defaults below
    uv run python benchmarks/plan_paper.py --rates 400 200 --slots 8

Prints the plan and a table of compute time for several rate assumptions.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from privdom_ray import costs, grid  # noqa: E402
from privdom_ray.domains._common import VAL_FRAC  # noqa: E402

#: paper.md: train / test images (frontal). MIMIC (pretraining only) about 240k frontal images
#: (not in paper.md; an assumption), 5% of them held out as its test split.
PAPER_SPLITS = {
    "MIMIC": (228_000, 12_000),
    "VDR": (15_000, 3_000),
    "C14": (86_524, 25_596),
    "CPT": (128_356, 29_320),
    "UKA": (153_500, 39_824),
    "PCH": (88_000, 22_045),
}
GOAL_HOURS, GOAL_GPUS = 24.0, 8


def splits() -> dict[str, dict[str, int]]:
    out = {}
    for name, (train, test) in PAPER_SPLITS.items():
        val = round(train * VAL_FRAC)
        out[name] = {"train": train - val, "val": val, "test": test}
    return out


def load_paper_grid(work: Path) -> grid.SweepSpec:
    """experiments/paper.yaml with each dataset root replaced by an empty folder (the grid
    checks that roots exist; the plan never reads them)."""
    raw = yaml.safe_load((ROOT / "experiments" / "paper.yaml").read_text())
    for d in raw["domains"]:
        (work / d["name"]).mkdir(parents=True, exist_ok=True)
        d["root"] = str(work / d["name"])
    raw["output"] = str(work / "out")
    path = work / "paper.yaml"
    path.write_text(yaml.safe_dump(raw))
    return grid.load_grid(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", type=float, nargs=2, default=(300.0, 150.0), metavar=("PLAIN", "DP"),
                   help="training images/s of one slot, plain and DP (default 300 150)")  # fmt: skip
    p.add_argument("--slots", type=int, default=8, help="slots at once (default 8: one per GPU)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        spec = load_paper_grid(Path(tmp))
        sizes = splits()
        fps = {name: f"paper-{name}" for name in sizes}  # stand-ins: keys are not the point
        rate = costs.Rate(args.rates[0], args.rates[1], "assumed")
        cost = costs.estimate(spec, sizes, fps, rate=rate, slots=args.slots)
        print(costs.render(cost, spec))
    print(f"\n# compute time against the goal ({GOAL_HOURS:.0f} h on {GOAL_GPUS} GPUs)\n")
    print("| plain img/s per slot | DP img/s per slot | slots | wall time | within the goal |")
    print("|---|---|---|---|---|")
    rows = dict.fromkeys([(args.rates[0], args.rates[1], args.slots), (300, 150, 8),
                          (600, 300, 8), (300, 150, 16), (1200, 600, 8)])  # fmt: skip
    for plain, dp, slots in rows:
        cost.rate, cost.slots = costs.Rate(plain, dp, "assumed"), slots
        hours = cost.compute_seconds / slots / 3600
        print(f"| {plain:,.0f} | {dp:,.0f} | {slots} | {hours:,.1f} h | "
              f"{'yes' if hours <= GOAL_HOURS else 'no'} |")  # fmt: skip
    # what decides it: the DP training images; the DP rate per GPU (plain = 2x DP) that fits
    work = (cost.train_images.get("plain", 0) / 2 + cost.train_images.get("dp", 0)
            + cost.eval_images / (2 * costs.EVAL_SPEEDUP))  # fmt: skip
    need = work / (GOAL_HOURS * 3600 * GOAL_GPUS)
    share = cost.train_images.get("dp", 0) / work
    print(f"\nDP training is {share:.0%} of the work (in DP-image units); the grid fits "
          f"{GOAL_HOURS:.0f} h on {GOAL_GPUS} GPUs at {need:,.0f} DP (and {2 * need:,.0f} plain) "
          "training images/s per GPU, one trial per GPU.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
