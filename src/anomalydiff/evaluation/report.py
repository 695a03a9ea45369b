"""``anomalydiff report RUN_DIR``: one self-contained HTML page with the tables, plots and example panels.

``RUN_DIR`` is a demo folder (``demo.json``, from ``anomalydiff demo``: what it did, models, metrics, examples,
predictions on held-out scans and stage times), a benchmark folder (``results.json``, from ``anomalydiff
benchmark``) or a single run (``metrics.json`` + ``maps.npz``, from ``anomalydiff detect``). The page embeds every figure as a base64 PNG
(so the HTML alone is complete); the PNGs are also written beside it in ``RUN_DIR/figures/``.

Example panels (per method, from its first seed's ``maps.npz``): the best, median and worst per-slice Dice
among ground-truth unhealthy test slices, with columns input | healthy-guided prediction (AnoFPDM's HGP at
t_e) or reconstruction | anomaly map | predicted (un-gated) mask | ground truth.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from anomalydiff.evaluation import figures

__all__ = ["write_report"]

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1280px;
       color: #1d1d1f; line-height: 1.45; padding: 0 16px; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0 1em; font-size: 0.88em; }
th, td { border: 1px solid #d0d0d0; padding: 4px 8px; text-align: right; }
th { background: #f3f4f6; } td.l, th.l { text-align: left; }
tr.alt td { color: #555; background: #fafafa; }
.tick { color: #0a7d2c; font-weight: bold; } .cross { color: #b3261e; font-weight: bold; }
.meta { color: #555; font-size: 0.9em; } figure { margin: 0.8em 0 1.6em; } figcaption { color: #555; font-size: 0.9em; }
img { max-width: 100%; border: 1px solid #eee; } code { background: #f3f4f6; padding: 1px 4px; border-radius: 3px; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _pct(mean: Any, std: Any = None, n_runs: int = 1) -> str:
    if mean is None or (isinstance(mean, float) and not math.isfinite(mean)):
        return "–"
    text = f"{100 * float(mean):.1f}"
    if n_runs > 1 and std is not None and math.isfinite(float(std)):
        text += f" ± {100 * float(std):.1f}"
    return text


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], left: int = 1, row_classes: Sequence[str] | None = None) -> str:
    """HTML table; the first ``left`` columns left-aligned; cells are already-escaped HTML."""
    out = ["<table><thead><tr>"]
    out += [f"<th class='{'l' if i < left else ''}'>{_e(h)}</th>" for i, h in enumerate(header)]
    out.append("</tr></thead><tbody>")
    for index, row in enumerate(rows):
        cls = f" class='{row_classes[index]}'" if row_classes and row_classes[index] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td class='{'l' if i < left else ''}'>{c}</td>" for i, c in enumerate(row)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _mark(uses_pixel_labels: bool) -> str:
    return "<span class='cross'>✗</span>" if uses_pixel_labels else "<span class='tick'>✓</span>"


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f"<figure><img alt='{_e(caption)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{_e(caption)} <span class='meta'>({_e(path.name)})</span></figcaption></figure>")


def _load_maps(run_dir: Path) -> dict[str, np.ndarray] | None:
    path = run_dir / "maps.npz"
    if not path.exists():
        return None
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _examples(run_dir: Path, figure_dir: Path, slug: str, title: str) -> str:
    maps = _load_maps(run_dir)
    if maps is None or "gt_mask" not in maps:
        return f"<p class='meta'>{_e(title)}: no maps with pixel labels in {_e(run_dir)}.</p>"
    path = figure_dir / f"examples_{slug}.png"
    chosen = figures.plot_examples(maps, path, title)
    caption = (f"{title}: good / median / failed cases (best, median and worst Dice among ground-truth unhealthy "
               f"test slices; slices {chosen['good']}, {chosen['median']}, {chosen['failed']}). Masks are un-gated "
               "(unhealthy setup); the row label shows the method's healthy/unhealthy gate where it has one.")
    return _img(path, caption)


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "run"


def _benchmark_page(run_dir: Path, results: dict[str, Any], figure_dir: Path) -> str:
    config = results["config"]
    ev = config["evaluation"]
    rows = results["rows"]
    parts = [
        f"<h1>{_e(results['benchmark'])}: AnoFPDM Table 1 on the built-in phantom</h1>",
        f"<p>{_e(config.get('description', ''))}</p>",
        "<p class='meta'>"
        f"Command <code>{_e(results['command'])}</code> · started {_e(results['started'])} · finished "
        f"{_e(results['finished'])} · total {results['timings'].get('total_seconds', 0):.0f} s · device "
        f"{_e(results['device'])} ({_e(results['machine'].get('cpu_count'))} cores, "
        f"{_e(results['machine'].get('torch_threads'))} torch threads, torch {_e(results['machine'].get('torch'))})</p>",
        f"<p>Test: <b>{results['samples']['test_slices']}</b> distinct <code>{_e(ev['split'])}</code> slices "
        f"({results['samples']['test_unhealthy']} unhealthy); validation: {results['samples']['val_slices']} slices "
        f"({results['samples']['val_unhealthy']} unhealthy), sample seed {ev['seed']}; method seeds "
        f"{_e(results['seeds'])}. Everything fitted (AnoFPDM's w, τ<sub>cos</sub>, D*<sub>max</sub>; the baselines' "
        "thresholds) was fitted on validation only.</p>",
        "<h2>Table 1: segmentation (%)</h2>",
        "<p class='meta'>Mean ± std over seeds. <span class='tick'>✓</span> nothing tuned with pixel labels, "
        "<span class='cross'>✗</span> a threshold or the method's settings were tuned with pixel labels (AnoFPDM "
        "Table 1's column). Mixed: all test slices, masks gated by the method's healthy/unhealthy decision where it "
        "has one; Unhealthy: ground-truth unhealthy slices, un-gated masks. 5×5 median filter, components ≤ 40 px "
        "removed, empty vs empty = 1 (spec C.9, C.10). Grey rows: the same maps with a label-free threshold. "
        "* deterministic (one run).</p>",
    ]
    table_rows, classes = [], []
    for row in rows:
        cells = [_e(row["type"]), _mark(row["uses_pixel_labels"]), _e(row["label"] + ("*" if row["deterministic"] else "")),
                 _e(row["threshold_policy"])]
        for setup in ("mixed", "unhealthy"):
            for metric in ("dice", "iou", "auprc"):
                cells.append(_pct(row[setup].get(metric), row[setup].get(f"{metric}_std"), row["n_runs"]))
        table_rows.append(cells)
        classes.append("alt" if row["alternative"] else "")
    parts.append(_table(["Type", "Labels", "Method", "Threshold", "Mixed DICE", "Mixed IoU", "Mixed AUPRC",
                         "Unh. DICE", "Unh. IoU", "Unh. AUPRC"], table_rows, left=4, row_classes=classes))
    parts.append("<h2>Cost</h2><p class='meta'>NFE: diffusion-network evaluations per slice; seconds: wall time of "
                 "<code>score</code> per slice; peak memory: peak resident memory of the run (GPU: allocated).</p>")
    cost_rows = []
    for row in rows:
        if row["alternative"]:
            continue
        c = row["cost"]
        cost_rows.append([_e(row["label"]), f"{c['nfe_per_slice']:.0f}", f"{c['classifier_evaluations_per_slice']:.0f}",
                          f"{c['seconds_per_slice']:.3f}", f"{c['cpu_seconds_per_slice']:.3f}",
                          f"{c['peak_memory_mb']:.0f}", f"{c['fit_seconds']:.1f}",
                          _e(", ".join(f"{w:g}" for w in row["chosen_w"]) or "–")])
    parts.append(_table(["Method", "NFE / slice", "classifier evals / slice", "s / slice", "CPU s / slice",
                         "peak MiB", "fit s", "chosen w"], cost_rows))
    stride = results.get("stride_curve")
    if stride:
        parts.append("<h2>AnoFPDM: quality vs speed over step_stride</h2>")
        parts.append(_table(
            ["step_stride", "steps", "NFE / slice", "s / slice", "Mixed DICE", "Mixed AUPRC", "Unh. DICE", "Unh. AUPRC", "chosen w"],
            [[str(p["step_stride"]), str(p["evaluated_steps"]), f"{p['nfe_per_slice']:.0f}", f"{p['seconds_per_slice']:.3f}",
              _pct(p.get("mixed_dice")), _pct(p.get("mixed_auprc")), _pct(p.get("unhealthy_dice")),
              _pct(p.get("unhealthy_auprc")), f"{p['chosen_w']:g}"] for p in stride["points"]]))
    figure_entries = results.get("figures", {})
    for caption, relative in figure_entries.items():
        path = run_dir / relative
        if path.exists():
            parts.append(_img(path, caption))
    ablations = results.get("ablations") or {}
    notes = []
    if ablations.get("guidance"):
        g = ablations["guidance"]
        notes.append(f"Guidance strength: w = {g['chosen_w']:g} selected on validation ({_e(g['rule'])}); the curve is "
                     f"the test subset of {g.get('slices')} slices, shown, not used.")
    if ablations.get("end_step"):
        e = ablations["end_step"]
        notes.append(f"End step: AAM over [0, round(r·t<sub>e</sub>)) from the kept per-step predictions; at r = 1 "
                     f"it reproduces the method's own masks: {_e(e.get('matches_method_at_ratio_1'))}.")
    if ablations.get("thresholds"):
        t = ablations["thresholds"]
        notes.append(f"Thresholds: Algorithm 1 mixed Dice {_pct(t['dynamic']['mixed_dice'])}, unhealthy "
                     f"{_pct(t['dynamic']['unhealthy_dice'])}; best fixed threshold (chosen on these test maps, an upper "
                     f"bound): mixed {_pct(max(p['mixed_dice'] for p in t['points']))}, unhealthy "
                     f"{_pct(max(p['unhealthy_dice'] for p in t['points']))}.")
    if notes:
        parts.append("<h2>Ablation notes</h2><ul>" + "".join(f"<li>{n}</li>" for n in notes) + "</ul>")
    parts.append("<h2>Examples</h2>")
    for row in rows:
        if row["alternative"] or not row["run_dirs"]:
            continue
        parts.append(_examples(Path(row["run_dirs"][0]), figure_dir, _slug(row["label"]), row["label"]))
    parts.append("<h2>Models and data</h2>")
    parts.append(_table(["part", "sha256", "step", "weights"],
                        [[_e(name), f"<code>{_e(m['sha256'])}</code>", _e(m.get("step")), _e(m["weights"])]
                         for name, m in results["models"].items()]))
    data = results.get("data", {})
    split_rows = [[_e(s), _e(v["subjects"]), _e(v["slices"]), _e(v["unhealthy"])] for s, v in data.get("splits", {}).items()]
    parts.append(f"<p class='meta'>Store <code>{_e(data.get('store'))}</code>, shape {_e(data.get('shape'))}, "
                 f"modalities {_e(data.get('modalities'))}.</p>")
    parts.append(_table(["split", "subjects", "slices", "unhealthy slices"], split_rows))
    parts.append(_table(["stage", "seconds"], [[_e(k), f"{v:.1f}"] for k, v in results["timings"].items()]))
    return "\n".join(parts)


def _run_page(run_dir: Path, metrics: dict[str, Any], figure_dir: Path) -> str:
    samples, cost = metrics["samples"], metrics["cost"]
    parts = [
        f"<h1>{_e(metrics['name'])} ({_e(metrics['method'])})</h1>",
        f"<p class='meta'>{samples['slices']} <code>{_e(samples['split'])}</code> slices ({samples['unhealthy']} "
        f"unhealthy); fitted on {samples['val_slices']} <code>{_e(samples['val_split'])}</code> slices; store "
        f"<code>{_e(metrics['info'].get('store'))}</code>.</p>",
        "<h2>Segmentation (%)</h2>",
    ]
    rows = []
    for name, evaluation in metrics["evaluations"].items():
        reports = evaluation["reports"]
        cells = [_e(name + (" (primary)" if name == metrics["primary"] else "")), _mark(evaluation["uses_pixel_labels"])]
        for setup in ("mixed", "unhealthy"):
            values = reports.get(setup, {}).get("values", {})
            cells += [_pct(values.get(m)) for m in ("dice", "iou", "auprc")]
        rows.append(cells)
    parts.append(_table(["Threshold", "Labels", "Mixed DICE", "Mixed IoU", "Mixed AUPRC", "Unh. DICE", "Unh. IoU",
                         "Unh. AUPRC"], rows, left=2))
    parts.append("<h2>Cost</h2>")
    parts.append(_table(["NFE / slice", "classifier evals / slice", "s / slice", "CPU s / slice", "peak MiB", "fit s"],
                        [[f"{cost['nfe_per_slice']}", f"{cost['classifier_evaluations_per_slice']}",
                          f"{cost['seconds_per_slice']:.3f}", f"{cost['cpu_seconds_per_slice']:.3f}",
                          f"{cost['peak_memory_mb']:.0f}", f"{cost['fit_seconds']:.1f}"]], left=0))
    parts.append("<h2>Examples</h2>")
    parts.append(_examples(run_dir, figure_dir, _slug(metrics["name"]), metrics["name"]))
    parts.append(f"<h2>Calibration</h2><pre>{_e(json.dumps(metrics['calibration'], indent=1)[:4000])}</pre>")
    return "\n".join(parts)


def _seconds(value: Any) -> str:
    return "–" if value is None else f"{float(value):.1f}"


def _demo_page(run_dir: Path, demo: dict[str, Any], figure_dir: Path) -> str:
    """The page of an ``anomalydiff demo`` folder (``demo.json``; see :mod:`anomalydiff.evaluation.demo`)."""
    import shutil

    data, settings, machine = demo.get("data", {}), demo.get("settings", {}), demo.get("machine", {})
    methods, predictions = demo.get("methods", []), demo.get("predictions", [])
    splits = data.get("splits", {})
    first = methods[0]["samples"] if methods else {}
    parts = [
        "<h1>anomalydiff demo: weakly-supervised anomaly segmentation on the built-in brain phantom</h1>",
        "<p class='meta'>"
        f"Command <code>{_e(demo.get('command'))}</code> · started {_e(demo.get('started'))} · finished "
        f"{_e(demo.get('finished', '(not finished)'))} · total {_seconds(demo.get('total_seconds'))} s · device "
        f"{_e(machine.get('device'))} ({_e(machine.get('cpu_count'))} cores, {_e(machine.get('torch_threads'))} torch "
        f"threads, load average {_seconds(machine.get('load_average_1min'))}, torch {_e(machine.get('torch'))})</p>",
        "<h2>What the demo did</h2><ol>",
        f"<li>Wrote <b>{_e(data.get('subjects'))}</b> synthetic subjects in the BraTS 2021 layout (four contrasts on "
        f"real MNI152 anatomy, {_e(data.get('voxel_size_mm'))} mm, seed {_e(data.get('seed'))}: none of them was seen "
        f"in training; lesion-free: {_e(', '.join(data.get('lesion_free_subjects', [])) or 'none')}) to "
        f"<code>{_e(data.get('phantom_root'))}</code>.</li>",
        f"<li>Prepared them into a slice store with the models' own preprocessing "
        f"(<code>{_e(data.get('preprocess'))}</code>: {_e(data.get('resolution'))} px, channels "
        f"{_e(', '.join(data.get('channels', [])))}), split by subject into validation and test.</li>",
        f"<li>Fitted each method on <b>{_e(first.get('val_slices'))}</b> label-balanced validation slices "
        f"({_e(first.get('val_unhealthy'))} unhealthy) with image-level labels only, scored <b>{_e(first.get('slices'))}"
        f"</b> label-balanced test slices ({_e(first.get('unhealthy'))} unhealthy) and evaluated them against the "
        "phantom's lesion masks.</li>",
        "<li>Predicted on held-out test subjects straight from their NIfTI files, writing anomaly maps and masks in "
        "each scan's own space.</li></ol>",
        "<h2>Data</h2>",
        _table(["split", "subjects", "slices", "unhealthy slices"],
               [[_e(split), _e(", ".join(v["subjects"])), _e(v["slices"]), _e(v["unhealthy"])]
                for split, v in splits.items()], left=2),
        f"<p class='meta'>Store <code>{_e(data.get('store'))}</code>.</p>",
        "<h2>Models</h2>",
    ]
    model_rows = []
    notes = []
    for name, model in demo.get("models", {}).items():
        card = model.get("card") or {}
        trained = f"{card['steps']}" + (f" of {card['target_steps']}" if card.get("target_steps") else "") if card.get(
            "steps") is not None else _e(model.get("step"))
        model_rows.append([_e(name), _e(model.get("model_class")), f"<code>{_e(model.get('sha256'))}</code>",
                           _e(model.get("step")), _e(trained), _e(card.get("num_parameters", "–")),
                           _e(card.get("wall_time_hours", "–")), _e(model.get("weights"))])
        if card.get("data"):
            notes.append(f"<li><b>{_e(name)}</b>: {_e(card['data'])}</li>")
    parts.append(_table(["part", "class", "sha256 (EMA weights)", "EMA step", "training steps (of planned)",
                         "parameters", "training hours", "weights"], model_rows, left=3))
    if notes:
        parts.append("<p class='meta'>Training data (from each part's card.json):</p><ul class='meta'>"
                     + "".join(notes) + "</ul>")

    # segmentation table: one row per method and threshold
    parts.append("<h2>Segmentation on the test sample (%)</h2>")
    parts.append(
        "<p class='meta'><span class='tick'>✓</span> no pixel label was used for the row (fitting saw image-level "
        "labels only), <span class='cross'>✗</span> a threshold was chosen with pixel labels (shown for reference). "
        "Mixed: all test slices, masks gated by the method's healthy/unhealthy decision where it has one; Unhealthy: "
        "ground-truth unhealthy slices, un-gated masks. Dice and IoU: mean over slices (empty vs empty = 1) after a "
        "5×5 median filter and removal of components ≤ 40 px; AUPRC and AUROC: pixel-level, pooled over brain pixels "
        "of the continuous map. Grey rows: the same maps with another threshold.</p>")
    rows, classes = [], []
    for method in methods:
        for name, evaluation in method["evaluations"].items():
            primary = name == method["primary"]
            threshold = "own (native)" if name == "native" else name
            cells = [_e(method["label"]), _e(threshold + (" (primary)" if primary and name != "native" else "")),
                     _mark(evaluation["uses_pixel_labels"])]
            for setup in ("mixed", "unhealthy"):
                values = evaluation.get(setup, {})
                cells += [_pct(values.get(m)) for m in ("dice", "iou", "auprc", "pixel_auroc")]
            rows.append(cells)
            classes.append("" if primary else "alt")
    parts.append(_table(["Method", "Threshold", "Pixel labels", "Mixed DICE", "Mixed IoU", "Mixed AUPRC",
                         "Mixed AUROC", "Unh. DICE", "Unh. IoU", "Unh. AUPRC", "Unh. AUROC"], rows, left=3,
                        row_classes=classes))

    # settings
    parts.append("<h2>Settings</h2><ul>")
    for method in methods:
        calibration = method.get("calibration") or {}
        fitted = []
        if calibration.get("guidance_w") is not None:
            how = "fixed in the preset" if calibration.get("select_w") is False else "chosen on validation"
            fitted.append(f"guidance strength w = {float(calibration['guidance_w']):g} ({how})")
        if calibration.get("tau_cos") is not None:
            fitted.append(f"τ<sub>cos</sub> = {float(calibration['tau_cos']):.4g}")
        for policy_name, policy in (method.get("policies") or {}).items():
            if policy.get("threshold") is not None:
                fitted.append(f"{_e(policy_name)} threshold {float(policy['threshold']):.4g}")
        parts.append(f"<li><b>{_e(method['label'])}</b>: preset <code>{_e(method['preset'])}</code> with "
                     f"<code>{_e(' '.join(method['overrides']) or '(no overrides)')}</code>; parts "
                     f"{_e(', '.join(method['parts']))}. Fitted: {'; '.join(fitted) or 'nothing (per-image rule)'}. "
                     f"Files: <code>{_e(method['run_dir'])}</code> (metrics.json, calibration.json, maps.npz).</li>")
    parts.append("</ul>")

    # cost
    predict_speed: dict[str, list[float]] = {}
    for prediction in predictions:
        predict_speed.setdefault(prediction["method"], []).append(float(prediction["seconds_per_slice"]))
    parts.append("<h2>Cost</h2><p class='meta'>NFE: diffusion-network evaluations per slice; classifier evaluations "
                 "include the guidance gradients; seconds: wall time of <code>score</code> per slice on this machine "
                 "(predict: whole pipeline per slice, loading and writing included).</p>")
    parts.append(_table(
        ["Method", "NFE / slice", "classifier evals / slice", "s / slice", "CPU s / slice", "fit s", "peak MiB",
         "predict s / slice"],
        [[_e(m["label"]), f"{m['cost']['nfe_per_slice']:.0f}", f"{m['cost']['classifier_evaluations_per_slice']:.0f}",
          f"{m['cost']['seconds_per_slice']:.3f}", f"{m['cost']['cpu_seconds_per_slice']:.3f}",
          f"{m['cost']['fit_seconds']:.1f}", f"{m['cost']['peak_memory_mb']:.0f}",
          (f"{np.mean(predict_speed[m['key']]):.3f}" if m["key"] in predict_speed else "–")] for m in methods]))

    # examples
    parts.append("<h2>Examples from the test sample</h2>")
    for method in methods:
        parts.append(_examples(Path(method["run_dir"]), figure_dir, _slug(method["key"]), method["label"]))

    # predictions
    if predictions:
        parts.append("<h2>Predictions on held-out scans (the scan's own space)</h2>")
        parts.append("<p class='meta'>What <code>anomalydiff predict</code> writes for a new scan: the anomaly map and "
                     "mask as NIfTI files with the input's shape and affine, a per-slice CSV and an overlay panel. "
                     "Subject decision: AnoFPDM flags a subject when at least 10 % of its slices are flagged by its "
                     "healthy/unhealthy gate; a method without a gate when its mask has any voxel. The 3-D Dice "
                     "against the phantom's segmentation is shown only; nothing was fitted on it.</p>")
        parts.append(_table(
            ["Method", "Subject", "true lesion", "decision", "flagged slices", "predicted volume (mm³)",
             "true volume (mm³)", "3-D Dice", "s / slice"],
            [[_e(p["label"]), _e(p["subject_id"]), "yes" if p["has_lesion"] else "no", _e(p["decision"]),
              f"{_e(p.get('flagged_slices'))} / {_e(p.get('num_slices'))}",
              _e("–" if p.get("lesion_volume_mm3") is None else f"{p['lesion_volume_mm3']:.0f}"),
              _e("–" if p.get("true_lesion_volume_mm3") is None else f"{p['true_lesion_volume_mm3']:.0f}"),
              _pct(p.get("dice_3d")), f"{p['seconds_per_slice']:.3f}"] for p in predictions], left=2))
        for prediction in predictions:
            overlay = Path(prediction["files"]["overlay"])
            if overlay.is_file():
                copy = figure_dir / f"predict_{_slug(prediction['method'])}_{_slug(prediction['subject_id'])}.png"
                shutil.copyfile(overlay, copy)
                parts.append(_img(copy, f"{prediction['label']} on {prediction['subject_id']}: top, the input (FLAIR); "
                                        "bottom, the anomaly map and the predicted mask outline"))
            files = prediction["files"]
            parts.append("<ul class='meta'>" + "".join(
                f"<li>{_e(desc)}: <code>{_e(files[desc])}</code></li>"
                for desc in ("anomalymap", "anomalymask", "slices", "summary") if desc in files) + "</ul>")

    # stages
    parts.append("<h2>Time per stage</h2>")
    stage_rows = [[_e(s["title"]), _seconds(s["seconds"]), _seconds(s.get("cpu_seconds"))] for s in demo.get("stages", [])]
    parts.append(_table(["stage", "wall s", "CPU s (all threads)"], stage_rows))
    parts.append(f"<p class='meta'>Machine-readable record: <code>{_e(run_dir / 'demo.json')}</code>. Settings: "
                 f"<code>{_e(json.dumps({k: settings.get(k) for k in ('subjects', 'seed', 'val_slices', 'test_slices', 'batch_size', 'predict_subjects')}))}</code>.</p>")
    return "\n".join(parts)


def write_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/report.html`` (figures embedded, PNGs also in ``RUN_DIR/figures/``).

    Args:
        run_dir: a demo folder (``demo.json``), a benchmark folder (``results.json``) or a ``detect`` output
            folder (``metrics.json``).

    Returns:
        The HTML path.

    Raises:
        FileNotFoundError: the folder holds neither file.
    """
    run_dir = Path(run_dir)
    figure_dir = run_dir / "figures"
    figure_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "demo.json").exists():
        demo = json.loads((run_dir / "demo.json").read_text())
        body, title = _demo_page(run_dir, demo, figure_dir), "anomalydiff demo"
    elif (run_dir / "results.json").exists():
        results = json.loads((run_dir / "results.json").read_text())
        body, title = _benchmark_page(run_dir, results, figure_dir), results["benchmark"]
    elif (run_dir / "metrics.json").exists():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        body, title = _run_page(run_dir, metrics, figure_dir), metrics["name"]
    else:
        raise FileNotFoundError(
            f"{run_dir} has no demo.json (from `anomalydiff demo`), results.json (from `anomalydiff benchmark`) nor "
            "metrics.json (from `anomalydiff detect`); pass the folder one of them wrote"
        )
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)} · anomalydiff</title>"
            f"<style>{_CSS}</style></head><body>{body}<p class='meta'>Written by anomalydiff report on "
            f"{time.strftime('%Y-%m-%d %H:%M')}.</p></body></html>")
    path = run_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
