"""Markdown tables of docs/benchmarks.md, one writer per benchmark JSON (used by ``plot.py``).

Example:
    >>> print(md_table(["mode", "step ms"], [["bitfit-peft", 12.345]]))
    | mode | step ms |
    |---|---|
    | bitfit-peft | 12.3 |
"""

from __future__ import annotations

from typing import Any

MODE_LABELS = {
    "full": "full FT",
    "naive_bias": "naive bias-freeze",
    "naive_bias_lowmem": "naive bias-freeze (bf16 base)",
    "lora": "LoRA r8 (all-linear)",
    "beft": "PEFT BEFT (all-linear)",
    "bitfit": "bitfit-peft",
    "bitfit_lowmem": "bitfit-peft low-mem (bf16 base)",
}


def fmt(x: Any, nd: int = 2) -> str:
    """Compact number formatting for markdown cells."""
    if x is None:
        return "–"
    if isinstance(x, float):
        if x != x:
            return "–"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        return f"{x:.{nd}f}" if abs(x) >= 0.01 else f"{x:.2g}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * len(headers)) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def md_train(ts: dict[str, Any]) -> str:
    out = []
    for model, r in ts["results"].items():
        if "modes" not in r:
            out.append(f"**{model}**: failed: `{r.get('error')}`\n")
            continue
        s = r["spec"]
        out.append(
            f"**{model}** (hidden {s['hidden']}, {s['layers']} layers, vocab {s['vocab']}, batch "
            f"{s['batch']}×{s['seq']}, {s['kind']}, default precision {r['amp']}):\n"
        )
        rows = []
        for mode, m in r["modes"].items():
            rows.append(
                [
                    MODE_LABELS.get(mode, mode),
                    m.get("trainable"),
                    m.get("step_ms"),
                    m.get("time_ratio"),
                    m.get("peak_mb"),
                    m.get("mem_ratio"),
                    m.get("autocast"),
                    (m.get("error") or "")[:80],
                ]
            )
        out.append(
            md_table(
                ["mode", "trainable params", "step ms (median)", "× full", "peak MB", "× full", "autocast", "error"],
                rows,
            )
        )
        method = next((m.get("mem_method") for m in r["modes"].values() if m.get("mem_method")), None)
        if method:
            out.append(f"\nMemory: {method}.\n")
    return "\n".join(out)


def md_compile(r: dict[str, Any]) -> str:
    """One paragraph on the torch.compile stages of a forward result."""
    c = r.get("compile")
    if not c:
        return ""
    bits = []
    for name, p in c.get("patterns", {}).items():
        if "error" in p:
            bits.append(f"`{name}` failed: `{p['error'].splitlines()[0][:120]}`")
        elif "first_call_s" in p:
            bits.append(f"`{name}` first call {fmt(p['first_call_s'])} s, frames compiled: {p['frames_compiled']}")
    text = (
        f"\n`torch.compile` (mode `{c.get('mode')}`): compiled patterns are timed in interleaved stages against the"
        " eager `base` of the same stage (× base) and against `base_compiled` (× base_compiled, the fair comparison)."
        " Stage *single* runs in a fresh Dynamo state; stage *mixed* then adds mixed-batch calls on the same"
        " compiled model (`bitfit_single_compiled_after_mixed`: one-adapter calls after that). " + "; ".join(bits) + "."
    )
    for key, st in c.get("stages", {}).items():
        d = st.get("dynamo", {})
        text += (
            f" Stage *{key}*: {st.get('recompiles_warmup')} recompiles while alternating, "
            f"{st.get('recompiles_timed', '–')} while timing"
            + (f"; eager base {fmt(st['base_ms'])} ms" if "base_ms" in st else "")
            + (f", base_compiled {fmt(st['base_compiled_ms'])} ms" if "base_compiled_ms" in st else "")
            + (
                f"; Dynamo so far: {d.get('unique_graphs')} graphs, {d.get('graph_breaks')} graph breaks, "
                f"{d.get('recompile_limit_hits')} recompile-limit hits"
                if d
                else ""
            )
            + "."
        )
    reasons = c.get("dynamo", {}).get("break_reasons") or {}
    if reasons:
        text += " Graph-break reasons: " + "; ".join(f"{n}× `{k}`" for k, n in list(reasons.items())[:6]) + "."
    return text + "\n"


def md_mixed(mb: dict[str, Any], label: str = "") -> str:
    out = []
    for part in ("forward", "generate"):
        r = mb["results"].get(part)
        if r is None:
            continue
        if "patterns" not in r:
            out.append(f"**{label}{part}** failed: `{r.get('error')}`\n")
            continue
        s = r["spec"]
        unit = "s" if part == "generate" else "ms"
        head = f"**{label}{part}**: {s['name']} batch {s['batch']}×{s['seq']}, {mb['n_tasks']} tasks, {r['dtype']}" + (
            f", {r['new_tokens']} new tokens (greedy)" if part == "generate" else ""
        )
        out.append(head + ":\n")
        pats = r["patterns"]
        if any("ratio_compiled" in v for v in pats.values()):
            rows = [[k, v.get(unit), v["ratio"], v.get("ratio_compiled")] for k, v in pats.items()]
            out.append(md_table(["pattern", f"{unit} (median)", "× base", "× base_compiled"], rows))
        else:
            rows = [[k, v.get(unit), v["ratio"]] for k, v in pats.items()]
            out.append(md_table(["pattern", f"{unit} (median)", "× base"], rows))
        if r.get("error"):
            out.append(f"\nPartial: `{r['error'][:200]}`\n")
        if r.get("check"):
            checks = ", ".join(f"{k} = {fmt(v) if isinstance(v, float) else v}" for k, v in r["check"].items())
            out.append(f"\nCorrectness (max |logit diff|): {checks}\n")
        compiled = md_compile(r)
        if compiled:
            out.append(compiled)
    return "\n".join(out)


def md_io(aio: dict[str, Any]) -> str:
    res = aio["results"]
    ref = res.get("lora", {})
    rows = []
    for kind, r in res.items():
        if "error" in r:
            rows.append([kind, f"failed: {r['error'][:80]}", None, None, None, None, None, None, None])
            continue
        fb = r["file_bytes"]
        rows.append(
            [
                kind,
                r["load_adapter_ms"],
                r.get("load_adapter_ms_many"),
                r["from_pretrained_ms"],
                r["set_adapter_ms"],
                r.get("set_adapter_ms_many"),
                fb["float32"] / 1024,
                (fb.get("bfloat16") or float("nan")) / 1024,
                fb["float32"] / ref["file_bytes"]["float32"] if "file_bytes" in ref else None,
            ]
        )
    t = aio["targets_ms"]
    resident = next((r["resident"] for r in res.values() if "resident" in r), "?")
    text = (
        f"{aio['spec']['name']} shape; targets: load < {t['load_adapter']} ms, switch < {t['set_adapter']} ms.\n\n"
        + md_table(
            [
                "adapter",
                "load_adapter ms (1 resident)",
                f"load_adapter ms ({resident} resident)",
                "from_pretrained ms",
                "set_adapter ms (2 resident)",
                f"set_adapter ms ({resident} resident)",
                "fp32 KiB",
                "bf16/fp16 KiB",
                "size × LoRA",
            ],
            rows,
        )
    )
    b = res.get("bitfit", {})
    if "meets_load_target" in b:
        text += (
            f"\n\nBitFit meets load target: **{b['meets_load_target']}**, "
            f"switch target: **{b['meets_switch_target']}**.\n"
        )
    return text
