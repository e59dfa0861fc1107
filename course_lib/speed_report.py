"""Chapter 3: the speed-and-quality report of one run of tools/hopper_speed.py, from its JSON alone.

:func:`speed_table` is the issue's table: each variant's latency (p10 / median / p90 ms over the timed
images), its speed-up over the fp32 original, its distance to the compute floor, PSNR and largest pixel
difference against the fp32 image of the same seed, compile time and first-image latency.
:func:`speed_markdown` adds the settings, the per-kernel-class profile of one DDIM step and where the
fastest path's time goes; :func:`plot_speed` draws latency bars and latency against PSNR.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from course_lib.files import save_png
from course_lib.profiling import kernel_table
from course_lib.timing import markdown_table

ORIGINAL = "fp32-separate"
SHORT = ("fp16-batched-graph-sdpa-hint-once", "best")     # the ladder's top, abbreviated in plots


def speed_table(data: dict) -> str:
    """Chapter 3: one markdown row per variant of ``data`` (skipped and failed ones say why)."""
    floor = data["settings"].get("floor_ms")
    ref = next((r for r in data["variants"] if r["variant"] == ORIGINAL and "total" in r), None)
    rows = []
    for r in data["variants"]:
        if "total" not in r:
            rows.append([r["variant"], r.get("skipped") or "error: " + str(r.get("error", "?"))[:90]] + [None] * 6
                        + [r.get("kind")])
            continue
        t, med = r["total"], r["total"]["median"]
        note = [r["kind"]] + ([f"CPU twin of {r['twin_of']}"] if r.get("twin_of") else [])
        note += [f"capture failed: {r['capture_failed']}"] if r.get("capture_failed") else []
        note += [f"{r['psnr_vs_20_steps']:.1f} dB vs its 20-step image"] if "psnr_vs_20_steps" in r else []
        note += [f"same image as {r['twin']['variant']}: {r['twin']['identical']} (max diff {r['twin']['max_diff']})"] \
            if "twin" in r else []
        rows.append([r["variant"], f"{t['p10']:.1f} / {med:.1f} / {t['p90']:.1f}",
                     ref["total"]["median"] / med if ref else None, med / floor if floor else None,
                     r.get("psnr_vs_fp32"), r.get("max_diff_vs_fp32"), r.get("compile_s"), r.get("first_image_ms"),
                     "; ".join(note)])
    header = ["variant", "p10 / median / p90 ms", "x fp32 original", "x floor", "PSNR dB", "max diff", "compile s",
              "first image ms", "note"]
    return markdown_table(header, rows)


def speed_markdown(data: dict) -> str:
    """Chapter 3: the whole report as markdown: settings, :func:`speed_table`, profiles, stages, what was skipped."""
    env, st = data["environment"], data["settings"]
    floor = st.get("floor_ms")
    lines = [f"# canny2image on {env.get('gpu', st['device'])} without TensorRT (issue 19)", "",
             f"torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, driver {env.get('driver', '-')}; "
             f"preset {st['preset']} (random weights), {st['size'][0]}x{st['size'][1]}, 20 DDIM steps, guidance 9, "
             f"seeds {st['seeds']}; {st['iters']} timed images per variant (around process(): CUDA events on a GPU) "
             f"after a first image and {st['warmup']} warm-ups; floor {'-' if floor is None else f'{floor:.1f} ms'} "
             f"(15.8 TFLOP at 800 TFLOP/s); peaks {data.get('peaks', '-')}. Command: `{data['command']}`", "",
             speed_table(data), ""]
    lines += [f"- skipped {s['what']}: {s['reason']}" for s in data["skipped"]]
    profiles = {k: v for k, v in data["profiles"].items() if "classes" in v}
    if profiles:
        lines += ["", "## One DDIM step (ControlNet + UNet + guidance, batch 2) per kernel class: ms and kernels", "",
                  kernel_table(profiles)]
        for name, p in profiles.items():
            lines += ["", f"Top kernels of {name}:", "",
                      markdown_table(["kernel", "class", "count", "ms"], [[k["name"][:90], k["class"], k["count"], k["ms"]]
                                                                          for k in p["top"][:8]])]
    lines += [f"- profile {k} failed: {v['error']}" for k, v in data["profiles"].items() if "error" in v]
    stages = data.get("stages", {})
    if "stages" in stages:
        lines += ["", f"## Where the time of {stages['variant']} goes (median ms)", "",
                  markdown_table(["stage", "ms"], [[k, v["median"]] for k, v in stages["stages"].items()]
                                 + [["rest (host work, gaps)", stages["rest"]], ["whole image", stages["whole"]]])]
    if data.get("cut_off"):
        lines += ["", f"**{data['cut_off']}**"]
    return "\n".join(lines) + "\n"


def plot_speed(data: dict, path: str | Path, figsize: tuple[float, float] = (14.0, 5.5)) -> Path | None:
    """Chapter 3: median latency bars (log scale, p10-p90 whiskers, floor and 60 ms target) and latency against
    PSNR vs the fp32 image; saved as PNG at ``path``. None when nothing was measured."""
    from matplotlib.figure import Figure

    rows = [r for r in data["variants"] if "total" in r]
    if not rows:
        return None
    floor, target = data["settings"].get("floor_ms"), data["settings"].get("target_ms")
    fig = Figure(figsize=figsize)
    bars, dots = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.3, 1]})
    fig.subplots_adjust(left=0.24, right=0.98, bottom=0.11, top=0.92, wspace=0.22)
    y = np.arange(len(rows))[::-1]
    med = np.array([r["total"]["median"] for r in rows])
    err = np.array([[m - r["total"]["p10"], r["total"]["p90"] - m] for m, r in zip(med, rows)]).T
    colors = ["tab:gray" if r["kind"] == "reference" else "tab:orange" if r["kind"] == "other image" else "tab:blue"
              for r in rows]
    labels = [r["variant"].replace(*SHORT) for r in rows]
    bars.barh(y, med, xerr=err, color=colors, capsize=3)
    for yi, m, r in zip(y, med, rows):
        bars.text(r["total"]["p90"] * 1.08, yi, f"{m:.1f} ms", va="center", fontsize=7)
    if floor:
        bars.axvline(floor, color="tab:red", ls="--", label=f"floor {floor:.1f} ms")
        bars.axvline(target, color="tab:green", ls=":", label=f"target {target:.0f} ms")
        bars.legend(loc="lower right", fontsize=7)
    bars.set_yticks(y, labels, fontsize=7)
    bars.set_xscale("log")
    bars.set_xlim(min(floor or med.min(), med.min()) / 1.5, med.max() * 3)
    bars.set_xlabel(f"ms per image (median, p10-p90); {SHORT[1]} = {SHORT[0]}")
    for r, c, label in zip(rows, colors, labels):
        q = r.get("psnr_vs_fp32")
        if r["kind"] != "reference" and q is not None:
            q = 70.0 if isinstance(q, str) or not math.isfinite(q) else min(q, 70.0)     # "inf" in the JSON
            dots.plot(r["total"]["median"], q, "o", color=c)
            dots.annotate(label, (r["total"]["median"], q), fontsize=6, xytext=(3, 3), textcoords="offset points")
    dots.axhline(data["settings"].get("full_quality_db", 40.0), color="tab:green", ls=":")
    dots.set_xscale("log")
    dots.set_xlim(med.min() / 1.3, med.max() * 2.5)
    dots.set_xlabel("ms per image (median)")
    dots.set_ylabel("PSNR vs the fp32 image, same seed (dB; 70: 70 or more)")
    fig.suptitle(f"canny2image, {data['settings']['preset']}, {data['environment'].get('gpu', data['settings']['device'])}",
                 fontsize=10)
    return save_png(fig, path)
