"""Render pytest-benchmark JSON from ``bench/`` as markdown tables of ratios and memory.

    python -m bench.report RESULTS.json [MORE.json ...] [-o OUT.md] [--stat auto|median|min|mean]
                           [--merge-json MERGED.json]

Several JSON files (e.g. the layer and the model runs of ``bench/run_gpu.sh``) are read as one run.
Every ratio is recomputed here from the chosen statistic of each benchmark's rounds, so the report
does not depend on the order in which the contenders ran.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

CONTENDER_ORDER = ("floor", "reference", "compiled", "peft", "fused")
PASS_ORDER = ("fwd", "fwd+bwd")
MODE_ORDER = ("baseline", "pace", "fast", "lazy")
MiB = 1024.0**2
GiB = 1024.0**3

# Targets of issue 7 (docs/design.md section 3 floors).
TARGET_ADD_FLOOR = 1.15
TARGET_MUL_CLEAN_FLOOR = 1.15
TARGET_MUL_NOISY_VS_CLEAN = 1.3
TARGET_VS_COMPILED = 1.3
TARGET_MODEL_PACE_VS_REF = 1.5
TARGET_MODEL_FAST_VS_BASELINE = 1.1


# --- loading ---------------------------------------------------------------------------------------


def load(paths: Sequence[str]) -> dict[str, Any]:
    """Read one or more pytest-benchmark JSON files into one run (benchmarks and skips concatenated)."""
    merged: dict[str, Any] = {"benchmarks": [], "pace": {"environment": {}, "skipped": []}, "sources": []}
    for path in paths:
        with open(path) as fh:
            data = json.load(fh)
        if not isinstance(data, dict) or "benchmarks" not in data:
            raise ValueError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks' key)")
        merged["sources"].append(path)
        merged["benchmarks"].extend(data["benchmarks"])
        pace = data.get("pace") or {}
        if not merged["pace"]["environment"]:
            merged["pace"]["environment"] = dict(pace.get("environment") or {})
        merged["pace"]["skipped"].extend(pace.get("skipped") or [])
        for key in ("machine_info", "commit_info", "datetime", "version"):
            merged.setdefault(key, data.get(key))
    return merged


def resolve_stat(stat: str, env: dict[str, Any]) -> str:
    """``auto``: median on CUDA; min on CPU, where other processes on a shared machine inflate rounds."""
    if stat != "auto":
        return stat
    return "median" if env.get("device") == "cuda" else "min"


def _time(bench: dict[str, Any], stat: str) -> float | None:
    value = (bench.get("stats") or {}).get(stat)
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


# --- formatting ------------------------------------------------------------------------------------


def _fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def _fmt_mib(value: float | None) -> str:
    return "—" if value is None else f"{value / MiB:.0f}"


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def geomean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


ABSOLUTE_COLUMNS = ("floor ms", "fused TFLOP/s", "ms / step", "images/s", "tokens/s")
_HIDDEN: list[str] = []  # column names left out of every table (``--ratios-only``)


def _table(header: Sequence[str], rows: list[Sequence[str]], align: Sequence[str] | None = None) -> list[str]:
    align = align or ["l"] + ["r"] * (len(header) - 1)
    keep = [i for i, h in enumerate(header) if h not in _HIDDEN]
    header, align = [header[i] for i in keep], [align[i] for i in keep]
    rows = [[row[i] for i in keep] for row in rows]
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


# --- layer groups ----------------------------------------------------------------------------------


class LayerGroup:
    """The contenders of one (shape, op, noise, pass, dtype) group."""

    def __init__(self, info: dict[str, Any]):
        self.info = info
        self.times: dict[str, float] = {}
        self.mem: dict[str, float | None] = {}
        self.linear_time: float | None = None

    @property
    def floor(self) -> float | None:
        """Floor seconds: the frozen linear's time scaled to the op's GEMM-equivalent count."""
        if self.linear_time is None:
            return None
        return self.linear_time * self.info["gemm_equiv"] / _linear_equiv(self.info["pass"])

    @property
    def floor_two_gemm(self) -> float | None:
        tge = self.info.get("gemm_equiv_two_gemm")
        if self.linear_time is None or tge is None:
            return None
        return self.linear_time * tge / _linear_equiv(self.info["pass"])

    def ratio(self, contender: str) -> float | None:
        return _div(self.times.get(contender), self.floor)

    def speedup(self, other: str, of: str = "fused") -> float | None:
        """How many times faster ``of`` is than ``other`` (their time ratio)."""
        return _div(self.times.get(other), self.times.get(of))

    def tflops(self, contender: str) -> float | None:
        t = self.times.get(contender)
        return None if t is None else self.info["gemm_equiv"] * _flops_per_gemm(self.info) / t / 1e12


def _linear_equiv(pass_: str) -> float:
    return 1.0 if pass_ == "fwd" else 2.0


def _flops_per_gemm(info: dict[str, Any]) -> float:
    return 2.0 * info["n_rows"] * info["in_features"] * info["out_features"]


def _op_key(info: dict[str, Any]) -> tuple:
    return (info["op"], info["rank"], info["noise"], info["pass"], info["dtype"])


def layer_groups(benchmarks: list[dict[str, Any]], stat: str) -> OrderedDict[tuple, LayerGroup]:
    groups: OrderedDict[tuple, LayerGroup] = OrderedDict()
    for bench in benchmarks:
        info = bench.get("extra_info") or {}
        if info.get("kind") != "layer":
            continue
        key = (info["shape"], info["n_rows"], info["in_features"], info["out_features"], *_op_key(info))
        group = groups.setdefault(key, LayerGroup(info))
        t = _time(bench, stat)
        if t is None:
            continue
        if info["contender"] == "floor":
            group.linear_time = t
        group.times[info["contender"]] = t
        group.mem[info["contender"]] = info.get("peak_mem_extra_bytes")
    return groups


def _op_title(op: str, rank: Any, noise: str, pass_: str, dtype: str) -> str:
    noise_txt = {"sample": "per-sample noise", "none": "no noise"}.get(noise, f"noise={noise}")
    return f"`{op}` r{rank}, {noise_txt}, {pass_}, {dtype}"


def _by_op(groups: OrderedDict[tuple, LayerGroup]) -> OrderedDict[tuple, list[LayerGroup]]:
    out: OrderedDict[tuple, list[LayerGroup]] = OrderedDict()
    for g in groups.values():
        out.setdefault(_op_key(g.info), []).append(g)
    return out


def render_layer_tables(groups: OrderedDict[tuple, LayerGroup], has_memory: bool) -> list[str]:
    lines: list[str] = []
    for (op, rank, noise, pass_, dtype), gs in _by_op(groups).items():
        present = [c for c in CONTENDER_ORDER if any(c in g.times for g in gs)]
        others = [c for c in present if c not in ("floor",)]
        noisy_mul = op == "lora_mul" and noise != "none" and "fused" in present
        lines += ["", f"### {_op_title(op, rank, noise, pass_, dtype)}", ""]
        header = ["shape", "N×K→D", "GEMM-eq", "floor ms"] + [f"{c} × floor" for c in others]
        if noisy_mul:
            header.append("fused × 5-GEMM" if pass_ == "fwd+bwd" else "fused × 2-GEMM")
        if "fused" in present:
            header += [f"fused vs {c}" for c in ("reference", "compiled", "peft") if c in present]
            header.append("fused TFLOP/s")
        rows = []
        for g in gs:
            i = g.info
            dims = f"{i['n_rows']}×{i['in_features']}→{i['out_features']}"
            row = [i["shape"], dims, f"{i['gemm_equiv']:.3g}", _fmt_ms(g.floor)]
            row += [_fmt_ratio(g.ratio(c)) for c in others]
            if noisy_mul:
                row.append(_fmt_ratio(_div(g.times.get("fused"), g.floor_two_gemm)))
            if "fused" in present:
                row += [_fmt_ratio(g.speedup(c)) for c in ("reference", "compiled", "peft") if c in present]
                tf = g.tflops("fused")
                row.append("—" if tf is None else f"{tf:.0f}" if tf >= 10 else f"{tf:.2f}")
            rows.append(row)
        lines += _table(header, rows)
        if has_memory:
            lines += ["", "Peak memory above the inputs, MiB (`torch.cuda.max_memory_allocated`):", ""]
            mem_rows = [[g.info["shape"]] + [_fmt_mib(g.mem.get(c)) for c in present] for g in gs]
            lines += _table(["shape"] + present, mem_rows)
    return lines


# --- model benchmarks ------------------------------------------------------------------------------


def model_rows(benchmarks: list[dict[str, Any]], stat: str) -> list[dict[str, Any]]:
    rows = []
    for bench in benchmarks:
        info = bench.get("extra_info") or {}
        if info.get("kind") != "model":
            continue
        t = _time(bench, stat)
        tokens = info.get("tokens_per_call")
        rows.append(
            {
                **info,
                "time_s": t,
                "images_per_s": None if t is None else info["images_per_call"] / t,
                "tokens_per_s": None if t is None or tokens is None else tokens / t,
            }
        )
    return rows


def _model_index(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    return {(r["model"], r["precision"], r["mode"], r["contender"]): r for r in rows}


def render_model_tables(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    index = _model_index(rows)
    lines = []
    models = list(OrderedDict.fromkeys(r["model"] for r in rows))
    for model in models:
        mrows = [r for r in rows if r["model"] == model]
        first = mrows[0]
        adapter = f"`{first.get('adapter', '?')}` r{first.get('rank', '?')}"
        rate_key, rate_name = (
            ("tokens_per_s", "tokens/s") if first.get("tokens_per_call") else ("images_per_s", "images/s")
        )
        seq = f" × {first['seq_len']} tokens" if first.get("seq_len") else ""
        lines += ["", f"### {model}, batch {first['batch']}{seq}, {adapter}", ""]
        out = []
        order = {m: i for i, m in enumerate(MODE_ORDER)}
        corder = {c: i for i, c in enumerate(CONTENDER_ORDER)}
        mrows.sort(key=lambda r: (r["precision"], order.get(r["mode"], 9), corder.get(r["contender"], 9)))
        for r in mrows:
            ref = index.get((model, r["precision"], r["mode"], "reference"))
            base = index.get((model, r["precision"], "baseline", r["contender"]))
            speed = _div(r["images_per_s"], ref["images_per_s"]) if ref else None
            mem = r.get("peak_mem_bytes")
            rate = r.get(rate_key)
            out.append(
                [
                    r["precision"],
                    r["mode"],
                    r["contender"],
                    _fmt_ms(None if r["time_s"] is None else r["time_s"] / r["steps_per_call"]),
                    "—" if rate is None else f"{rate:.1f}",
                    "—" if mem is None else f"{mem / GiB:.2f}",
                    _fmt_ratio(speed),
                    _fmt_ratio(_div(r["time_s"], base and base["time_s"])),
                ]
            )
        header = [
            "precision",
            "mode",
            "contender",
            "ms / step",
            rate_name,
            "peak GiB",
            "vs reference",
            "step × baseline",
        ]
        lines += _table(header, out, ["l", "l", "l", "r", "r", "r", "r", "r"])
    return lines


# --- headline --------------------------------------------------------------------------------------


def _check(ok: bool | None) -> str:
    return "no data" if ok is None else ("met" if ok else "**missed**")


def render_headline(groups: OrderedDict[tuple, LayerGroup], mrows: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    by_op = _by_op(groups)
    has_fused = any("fused" in g.times for g in groups.values())
    header = ["op", "pass", "dtype", "shapes"]
    if has_fused:
        header += ["fused × floor", "fused vs reference", "fused vs compiled", "fused vs peft"]
    header += ["reference × floor", "compiled × floor", "peft × floor"]
    rows = []
    for (op, rank, noise, pass_, dtype), gs in by_op.items():
        label = f"{op} r{rank} {'noisy' if noise != 'none' else 'clean'}"
        row = [label, pass_, dtype, str(len(gs))]
        if has_fused:
            row += [_fmt_ratio(geomean(g.ratio("fused") for g in gs))]
            row += [_fmt_ratio(geomean(g.speedup(c) for g in gs)) for c in ("reference", "compiled", "peft")]
        row += [_fmt_ratio(geomean(g.ratio(c) for g in gs)) for c in ("reference", "compiled", "peft")]
        rows.append(row)
    if rows:
        lines += [
            "Geometric means over shapes. `× floor`: time over the docs/design.md section 3 floor (lower is "
            "better, 1.00× is the bound); `fused vs X`: X's time over fused's (higher is better).",
            "",
        ]
        lines += _table(header, rows, ["l", "l", "l"] + ["r"] * (len(header) - 3))
    if not has_fused:
        lines += ["", "**No fused (Triton) results in this run** — see *Skipped* below for the reason."]
        return lines

    # Targets of issue 7.
    lines += ["", "Targets (issue 7):", ""]

    def worst(gs: list[LayerGroup], fn) -> float | None:
        vals = [fn(g) for g in gs]
        vals = [v for v in vals if v is not None]
        return max(vals) if vals else None

    def bf16_bwd(op: str, noise: str) -> list[LayerGroup]:
        return [
            g
            for g in groups.values()
            if g.info["op"] == op
            and g.info["noise"] == noise
            and g.info["pass"] == "fwd+bwd"
            and g.info["dtype"] == "bf16"
        ]

    trows = []
    w = worst(bf16_bwd("lora_add", "sample"), lambda g: g.ratio("fused"))
    trows.append(
        [
            "lora_add fused fwd+bwd ≤ 1.15× floor (worst shape)",
            _fmt_ratio(w),
            _check(None if w is None else w <= TARGET_ADD_FLOOR),
        ]
    )
    w = worst(bf16_bwd("lora_mul", "none"), lambda g: g.ratio("fused"))
    trows.append(
        [
            "noise-free lora_mul fused fwd+bwd ≤ 1.15× floor (worst shape)",
            _fmt_ratio(w),
            _check(None if w is None else w <= TARGET_MUL_CLEAN_FLOOR),
        ]
    )
    clean = {(g.info["shape"], g.info["n_rows"]): g for g in bf16_bwd("lora_mul", "none")}
    ratios = []
    for g in bf16_bwd("lora_mul", "sample"):
        c = clean.get((g.info["shape"], g.info["n_rows"]))
        if c is not None and g.info["tokens"] == 197:
            ratios.append(_div(g.times.get("fused"), c.times.get("fused")))
    w = max([r for r in ratios if r is not None], default=None)
    trows.append(
        [
            "noisy lora_mul fused ≤ 1.3× noise-free fused at T = 197 (worst shape)",
            _fmt_ratio(w),
            _check(None if w is None else w <= TARGET_MUL_NOISY_VS_CLEAN),
        ]
    )
    speeds = [g.speedup("compiled") for g in groups.values() if g.info["dtype"] == "bf16"]
    speeds = [s for s in speeds if s is not None]
    w = min(speeds) if speeds else None
    trows.append(
        [
            "every fused op ≥ 1.3× faster than compiled (slowest group)",
            _fmt_ratio(w),
            _check(None if w is None else w >= TARGET_VS_COMPILED),
        ]
    )
    index = _model_index(mrows)
    # The model targets of issue 7 are for the bf16-autocast ViT step.
    vit = [m for m in OrderedDict.fromkeys(r["model"] for r in mrows if r["precision"] == "bf16-autocast")]
    for model in vit:
        fused_pace = index.get((model, "bf16-autocast", "pace", "fused"))
        ref_pace = index.get((model, "bf16-autocast", "pace", "reference"))
        s = _div(fused_pace and fused_pace["images_per_s"], ref_pace and ref_pace["images_per_s"])
        trows.append(
            [
                f"{model} PACE step ≥ 1.5× reference images/s (bf16)",
                _fmt_ratio(s),
                _check(None if s is None else s >= TARGET_MODEL_PACE_VS_REF),
            ]
        )
        fast = index.get((model, "bf16-autocast", "fast", "fused"))
        base = index.get((model, "bf16-autocast", "baseline", "fused"))
        s = _div(fast and fast["time_s"], base and base["time_s"])
        trows.append(
            [
                f"{model} PACE_fast step ≤ 1.1× fused baseline step (bf16)",
                _fmt_ratio(s),
                _check(None if s is None else s <= TARGET_MODEL_FAST_VS_BASELINE),
            ]
        )
    lines += _table(["target", "measured", "status"], trows, ["l", "r", "l"])
    return lines


# --- whole report ----------------------------------------------------------------------------------


def render(
    run: dict[str, Any], stat: str = "auto", notes: Sequence[str] = (), ratios_only: bool = False
) -> str:
    """The markdown report; ``ratios_only`` leaves out absolute times and rates (for CPU runs)."""
    _HIDDEN[:] = list(ABSOLUTE_COLUMNS) if ratios_only else []
    env = run["pace"].get("environment") or {}
    stat = resolve_stat(stat, env)
    groups = layer_groups(run["benchmarks"], stat)
    mrows = model_rows(run["benchmarks"], stat)
    device = env.get("device", "?")
    has_memory = any(v is not None for g in groups.values() for v in g.mem.values())

    lines = ["# PACE benchmark report", ""]
    where = f"**{env.get('device_name', '?')}** ({device})"
    if device == "cpu":
        threads = env.get("cpu_threads", "?")
        where += f", {threads} CPU thread{'' if threads == 1 else 's'}"
        where += " — **CPU numbers: ratios only, not GPU performance**"
    e = {
        k: env.get(k, "?")
        for k in (
            "date",
            "set",
            "set_rule",
            "torch",
            "cuda",
            "triton",
            "timm",
            "peft",
            "pytest_benchmark",
            "command",
        )
    }
    date = env.get("date") or run.get("datetime") or "?"
    sources = ", ".join(f"`{s}`" for s in run.get("sources", []))
    lines += [
        f"- device: {where}",
        f"- date: {date}; set: {e['set']} ({e['set_rule']})",
        f"- versions: torch {e['torch']} (CUDA {e['cuda']}), triton {e['triton']}, timm {e['timm']}, "
        f"peft {e['peft']}, pytest-benchmark {e['pytest_benchmark']}",
        f"- pytest command: `{e['command']}`; source: {sources}",
        f"- statistic: **{stat}** of each benchmark's rounds (per call)",
        *[f"- {note}" for note in notes],
        "",
        "Floor = frozen `nn.Linear` time (fwd, or fwd + input gradient) scaled to the op's GEMM-equivalent "
        "count (docs/design.md section 3: `lora_add` 1 + r(1/D+1/K) fwd, 2 + 3r(1/D+1/K) fwd+bwd; "
        "`lora_mul` 1 fwd, 3 fwd+bwd — for noisy `lora_mul` the per-sample-weight floor; the two-GEMM "
        "count, 2 / 5, is shown beside it).",
    ]

    lines += ["", "## Headline", ""]
    lines += render_headline(groups, mrows)

    if groups:
        lines += ["", "## Layers"]
        if not has_memory:
            lines += ["", "Peak memory: not measured on CPU (recorded as null in the JSON)."]
        lines += render_layer_tables(groups, has_memory)
    if mrows:
        lines += [
            "",
            "## Model training step",
            "",
            "images/s counts the batch's images, tokens/s the language model batch's tokens "
            "(PACE's two copies count once); one benchmark call "
            "runs two optimizer steps so lazy_half alternates its two kinds of step. `vs reference`: "
            "images/s over the reference's in the same mode (higher is better); `step × baseline`: "
            "step time over the same contender's baseline (no-PACE) step (lower is better).",
        ]
        lines += render_model_tables(mrows)

    skipped = run["pace"].get("skipped") or []
    if skipped:
        reasons: dict[str, int] = defaultdict(int)
        for s in skipped:
            reasons[s["reason"]] += 1
        lines += ["", "## Skipped", ""]
        skip_rows = [[str(n), r] for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])]
        lines += _table(["benchmarks", "reason"], skip_rows, ["r", "l"])
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="pytest-benchmark JSON file(s) written from bench/")
    parser.add_argument("-o", "--output", help="write the markdown here (default: stdout)")
    parser.add_argument(
        "--stat",
        default="auto",
        choices=("auto", "median", "min", "mean"),
        help="statistic of the rounds (auto: median on CUDA, min on CPU)",
    )
    parser.add_argument("--merge-json", help="also write the inputs merged into one JSON file here")
    parser.add_argument(
        "--note", action="append", default=[], help="a line to add under the header (repeatable)"
    )
    parser.add_argument(
        "--ratios-only",
        action="store_true",
        help="leave out absolute times and rates (floor ms, TFLOP/s, ms/step, images/s)",
    )
    args = parser.parse_args(argv)
    run = load(args.results)
    text = render(run, args.stat, args.note, args.ratios_only)
    if args.merge_json:
        merged = {k: v for k, v in run.items() if k != "sources"}
        merged["pace"] = {**merged["pace"], "notes": list(args.note)}
        with open(args.merge_json, "w") as fh:
            json.dump(merged, fh, indent=1)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
