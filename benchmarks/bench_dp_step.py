"""Benchmark: one DP-SGD step of ResNet9 per per-sample-gradient mode, against plain NAdam.

Why: DP-SGD's per-sample clipping dominates a private trial's cost. This script measures, side
by side in one process, one optimizer step (forward, backward, per-sample gradients or norms,
clipping, noise, NAdam step) per image for the non-DP step and every DP mode: Opacus's
``hooks``, ``functorch``, ``ew`` (expanded weights) and ``ghost`` (fast gradient clipping: ghost
norms for Linear, per-sample gradients + a second backward for convs), and ``bk``
(``privdom_ray.dpstep.bookkeeping.BookKeepingClipper``: one backward, mixed ghost norms, book-keeping).

Each mode is first checked for correctness: its clipped gradient for one noiseless step must
match a per-example loop (``dpcheck.clipping_error``), in every layout timed.
``--memory-format both`` times every mode in NCHW and in NHWC (``channels_last``, what
``resources.memory_format: auto`` uses on GPUs) in the same interleaved loop. Modes that fail or disagree are listed with
the reason and not timed. Repetitions are interleaved across modes (so load from other
processes hits all modes alike) and the median is reported. Peak memory of one step is measured
at ``--batch`` (CUDA allocator statistics, or on CPU the live-tensor-bytes tracker in dpstep) and
compared with the two-probe linear model that ``dpstep.max_physical_batch`` uses for the largest
physical batch under ``--budget-mb``.

Imports only torch, opacus and the project's models.py/dpstep package: runs on a GPU machine that
has nothing else. Examples:

    uv run python benchmarks/bench_dp_step.py                      # 64 px, batch 32, CPU
    uv run python benchmarks/bench_dp_step.py --size 128
    python benchmarks/bench_dp_step.py --size 512 --device cuda --batch 64 --budget-mb 40960 \
        --memory-format both
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # dpcheck: the checks

import dpcheck  # noqa: E402
import opacus  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from privdom_ray import dpstep  # noqa: E402
from privdom_ray.dpstep import bookkeeping  # noqa: E402
from privdom_ray.models import MODELS, build_model  # noqa: E402

ALL_MODES = ("nondp", *dpstep.DP_MODES)
LAYOUTS = {"contiguous": (False,), "channels_last": (True,), "both": (False, True)}
TOLERANCE = 1e-4  # clipping_error above this = wrong per-sample clipping


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    return _timed2(fn, device)[0]


def _timed2(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one call."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def _label(mode: str, channels_last: bool) -> str:
    return f"{mode} NHWC" if channels_last else mode


def _reason(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0][:160] if msg else ''}"


def layer_table(model_name: str, size: int, batch: int, device: torch.device, reps: int) -> None:
    """Per conv layer: ms for per-sample gradients by unfold+bmm, by grouped conv and (1x1
    convs) by bmm on the strided input, and for ghost norm + one weight-gradient conv, vs the
    plain weight gradient (what non-DP pays)."""
    model = build_model(model_name).to(device)
    records: dict[str, tuple[nn.Conv2d, torch.Tensor, torch.Tensor]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            mod.register_forward_hook(
                lambda m, i, o, name=name: records.__setitem__(name, (m, i[0].detach(), o))
            )
    x, _ = dpstep.synthetic_batch(batch, size, device)
    out = model(x)
    names = list(records)
    grads = torch.autograd.grad(out.sum(), [records[k][2] for k in names])

    def med(fn) -> float:
        fn()
        return 1000 * statistics.median(_timed(fn, device) for _ in range(reps))

    print(f"\n### Conv layers at {size} px, batch {batch}: ms per layer (median of {reps})\n")
    print(
        "| layer | T | D | O | T²(D+O)/(DO) | rule | unfold | grouped | pointwise "
        "| ghost + wgrad | wgrad |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, g in zip(names, grads, strict=True):
        m, a, _ = records[name]
        n, out_ch, positions = g.shape[0], g.shape[1], g.shape[2] * g.shape[3]
        depth = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        g3 = g.reshape(n, out_ch, positions)

        def unfold(m=m, a=a, g3=g3):
            cols = F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)
            return torch.bmm(g3, cols.transpose(1, 2))

        def grouped(m=m, a=a, g=g, n=n, out_ch=out_ch):
            return torch.ops.aten.convolution_backward(
                g.reshape(1, n * out_ch, *g.shape[2:]),
                a.reshape(1, n * m.in_channels, *a.shape[2:]),
                m.weight.detach().repeat(n, 1, 1, 1),
                None, m.stride, m.padding, m.dilation, False, [0, 0], n, [False, True, False],
            )[1]  # fmt: skip

        def pointwise(m=m, a=a, g3=g3):
            return torch.bmm(g3, bookkeeping._columns(m, a).transpose(1, 2))

        def wgrad(m=m, a=a, g=g):
            return torch.ops.aten.convolution_backward(
                g, a, m.weight, None, m.stride, m.padding, m.dilation, False, [0, 0], 1,
                [False, True, False],
            )[1]  # fmt: skip

        def ghost(m=m, a=a, g3=g3):
            cols = bookkeeping._columns(m, a)
            aa = torch.bmm(cols.transpose(1, 2), cols)
            return (aa * torch.bmm(g3.transpose(1, 2), g3)).sum(dim=(1, 2))

        t_w = med(wgrad)
        ratio = positions**2 * (depth + out_ch) / (depth * out_ch)
        t_ghost = f"{med(ghost) + t_w:.1f}" if positions <= 1024 else "(T too large)"
        t_point = f"{med(pointwise):.1f}" if bookkeeping._pointwise(m) else "-"
        print(
            f"| {name} | {positions} | {depth} | {out_ch} | {ratio:.0f} "
            f"| {dpstep.conv_strategy(m, positions, device=device)} | {med(unfold):.1f} "
            f"| {med(grouped):.1f} | {t_point} | {t_ghost} | {t_w:.1f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="resnet9", choices=sorted(MODELS))
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--batch", type=int, default=32, help="physical batch timed")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per mode")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--budget-mb", type=float, default=2048, help="memory budget, MiB")
    ap.add_argument("--modes", default=",".join(ALL_MODES))
    ap.add_argument("--check-size", type=int, default=32, help="image side of the parity check")
    ap.add_argument("--check-batch", type=int, default=6)
    ap.add_argument("--no-memory", action="store_true", help="skip memory and batch search")
    ap.add_argument("--layers", action="store_true", help="also time conv layers' strategies")
    ap.add_argument(
        "--memory-format",
        default="contiguous",
        choices=sorted(LAYOUTS),
        help="activation layout(s) timed: NCHW, NHWC (channels_last) or both side by side",
    )
    args = ap.parse_args()

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in ALL_MODES:
            ap.error(f"unknown mode {m!r}; known: {', '.join(ALL_MODES)}")
    if "nondp" not in modes:
        modes.insert(0, "nondp")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    cmd = (
        f"uv run python benchmarks/bench_dp_step.py --model {args.model} --size {args.size} "
        f"--batch {args.batch} --reps {args.reps} --device {args.device} "
        f"--threads {args.threads} --budget-mb {args.budget_mb:g} --modes {','.join(modes)}"
        + (" --no-memory" if args.no_memory else "")
        + (" --layers" if args.layers else "")
        + f" --memory-format {args.memory_format}"
    )
    print(f"Reproduce: `{cmd}`\n")
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    print(
        f"torch {torch.__version__}, opacus {opacus.__version__}, python "
        f"{platform.python_version()}, device {device} ({dev_name or platform.machine()}), "
        f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
        f"load average at start {load[0]:.2f}"
    )
    t_start = time.perf_counter()

    # every (mode, layout) pair is a variant, timed side by side; labels: "bk", "bk NHWC"
    layouts = LAYOUTS[args.memory_format]
    variants = {_label(m, cl): (m, cl) for cl in layouts for m in modes}

    # 1. correctness: clipped gradient vs a per-example loop
    status: dict[str, str] = {_label("nondp", cl): "n/a (no clipping)" for cl in layouts}
    failed: dict[str, str] = {}
    for label, (mode, cl) in variants.items():
        if mode == "nondp":
            continue
        try:
            err = dpcheck.clipping_error(
                args.model,
                mode,
                image_size=args.check_size,
                batch=args.check_batch,
                device=device,
                channels_last=cl,
            )
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            failed[label] = f"parity check raised {_reason(exc)}"
            continue
        status[label] = f"{err:.1e}"
        if not err <= TOLERANCE:
            failed[label] = f"wrong clipped gradient: relative error {err:.2e} > {TOLERANCE:g}"

    # 2. timing, interleaved
    steps: dict[str, dpstep.Step] = {}
    for label, (mode, cl) in variants.items():
        if label in failed:
            continue
        try:
            step = dpstep.build_step(
                args.model, args.size, mode, args.batch, device, channels_last=cl
            )
            step.run()  # warm-up: optimizer state, kernels, allocator
            steps[label] = step
        except Exception as exc:  # noqa: BLE001
            failed[label] = f"step raised {_reason(exc)}"
            if os.environ.get("BENCH_TRACEBACK"):
                traceback.print_exc()
    times: dict[str, list[float]] = {m: [] for m in steps}
    cpu_times: dict[str, list[float]] = {m: [] for m in steps}
    for _ in range(args.reps):
        for label, step in steps.items():
            wall, cpu = _timed2(step.run, device)
            times[label].append(wall)
            cpu_times[label].append(cpu)
    per_image = {m: 1000 * statistics.median(ts) / args.batch for m, ts in times.items()}
    cpu_per_image = {m: 1000 * statistics.median(ts) / args.batch for m, ts in cpu_times.items()}
    spread = {
        m: (1000 * min(ts) / args.batch, 1000 * max(ts) / args.batch) for m, ts in times.items()
    }

    # 3. memory: measured at --batch; NCHW also the linear model and max batch under the budget
    budget = int(args.budget_mb * 2**20)
    mem: dict[str, str] = {}
    fit: dict[str, str] = {}
    if not args.no_memory:
        for label, step in steps.items():
            mode, cl = variants[label]
            try:
                measured = dpstep.step_peak_bytes(step, device, warmup=0)
                mem[label] = f"{measured / 2**20:.0f}"
                if not cl:
                    model = dpstep.memory_model(args.model, args.size, mode, device)
                    mem[label] += f" / {model.peak(args.batch) / 2**20:.0f}"
                    fit[label] = str(model.max_batch(budget))
            except Exception as exc:  # noqa: BLE001
                mem[label] = fit[label] = f"failed: {_reason(exc)}"
    bk_layers = ""
    if "bk" in steps:
        clipper = steps["bk"].module.bookkeeping_clipper
        bk_layers = ", ".join(f"{k}={v}" for k, v in clipper.layer_modes.items())
    del steps

    print(
        f"\n### {args.model}, {args.size} px, batch {args.batch}, {args.device}, "
        f"{torch.get_num_threads()} thread(s): one optimizer step, median of {args.reps} "
        "interleaved repetitions (DP / non-DP: against non-DP in the same layout)\n"
    )
    print(
        "| mode | clipping error vs per-example loop | ms / image (min-max) | DP / non-DP "
        "| CPU ms / image | DP / non-DP (CPU time) "
        f"| peak MiB at batch {args.batch} (measured / linear model) "
        f"| max physical batch in {args.budget_mb:g} MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, (_mode, cl) in variants.items():
        if label not in per_image:
            continue
        lo, hi = spread[label]
        base = per_image.get(_label("nondp", cl))
        cpu_base = cpu_per_image.get(_label("nondp", cl))
        ratio = f"{per_image[label] / base:.2f}x" if base else "?"
        cpu_ratio = f"{cpu_per_image[label] / cpu_base:.2f}x" if cpu_base else "?"
        print(
            f"| {label} | {status.get(label, '?')} | {per_image[label]:.2f} ({lo:.2f}-{hi:.2f}) "
            f"| {ratio} | {cpu_per_image[label]:.2f} | {cpu_ratio} "
            f"| {mem.get(label, '-')} | {fit.get(label, '-')} |"
        )
    if failed:
        print("\nNot timed (failed or wrong):\n")
        for label, why in failed.items():
            print(f"- {label}: {why}")
    if bk_layers:
        print(f"\nbk per-layer strategy: {bk_layers}")
    for cl in layouts:
        base = per_image.get(_label("nondp", cl))
        dp_times = {m: per_image[_label(m, cl)] for m in modes[1:] if _label(m, cl) in per_image}
        if not dp_times or not base:
            continue
        best = min(dp_times, key=dp_times.__getitem__)
        opacus_best = min(
            (m for m in dp_times if m in dpstep.OPACUS_MODES),
            key=dp_times.__getitem__,
            default=None,
        )
        print(
            f"\n{'NHWC' if cl else 'NCHW'}: fastest correct DP mode: {best} "
            f"({dp_times[best] / base:.2f}x non-DP)"
            + (
                f"; fastest Opacus mode: {opacus_best} ({dp_times[opacus_best] / base:.2f}x)"
                if opacus_best
                else ""
            )
            + f". Target <= 1.5x: {'met' if dp_times[best] / base <= 1.5 else 'NOT met'}."
        )
    if len(layouts) == 2:
        print("\nNHWC / NCHW time per image, same mode:")
        for mode in modes:
            nchw, nhwc = per_image.get(_label(mode, False)), per_image.get(_label(mode, True))
            if nchw and nhwc:
                print(f"- {mode}: {nhwc / nchw:.2f}x")
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\nTotal {time.perf_counter() - t_start:.0f} s; load average at end {load_end:.2f}. "
        "Wall time is what a trial waits; CPU time (this process) is less disturbed by other "
        "processes on a shared machine (on CUDA it only counts the host side). "
        "Memory on CPU = parameters + optimizer state + batch + peak of live tensor bytes "
        "(dispatch-mode tracker; no kernel scratch or malloc overhead); on CUDA = the same "
        "state + max_memory_allocated growth. The linear model is fitted at batches 8 and 16."
    )
    if args.layers:
        layer_table(args.model, args.size, args.batch, device, args.reps)


if __name__ == "__main__":
    main()
