"""Markdown tables from benchmarks/results/engine.json (what benchmarks/ENGINE.md quotes).

    python benchmarks/engine_report.py [path/to/engine.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DEFAULT = Path(__file__).parent / "results" / "engine.json"


def _load(section: dict) -> str:
    return (f"load average before {section['load_average_before']}, after "
            f"{section['load_average_after']}, {section['wall_seconds']:.0f} s")


def context_tables(s: dict) -> list[str]:
    out = [f"### Hybrid vs twin, decode on a filled cache ({s['path']} path, state "
           f"{s['state_dtype']}; {_load(s)})", "",
           "| batch | context | hybrid s/step | twin s/step | hybrid tok/s | twin tok/s | "
           "measured ratio | predicted (f32 state) | predicted (bf16 state) | appendix |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for p in s["points"]:
        pr = p["predicted"]
        out.append(f"| {p['batch']} | {p['context']} | {p['hybrid']['step_s']:.4f} | "
                   f"{p['twin']['step_s']:.4f} | {p['hybrid_tok_s']:.1f} | {p['twin_tok_s']:.1f} "
                   f"| {p['measured_ratio']:.2f} | {pr['exact_state_float32']:.2f} | "
                   f"{pr['exact_state_bfloat16']:.2f} | {pr['appendix']:.2f} |")
    out += ["", "Whole generations (step cost integrated over context, trapezoid; prefill "
            "excluded):", "",
            "| batch | prompt+outputs | hybrid tok/s | twin tok/s | hybrid ms/token | "
            "twin ms/token | measured ratio | predicted | % of predicted |",
            "|---|---|---|---|---|---|---|---|---|"]
    for g in s["generations"]:
        out.append(f"| {g['batch']} | {g['prompt']}+{g['outputs']} | {g['hybrid']['tok_s']:.1f} "
                   f"| {g['twin']['tok_s']:.1f} | {g['hybrid']['per_token_latency_ms']:.1f} | "
                   f"{g['twin']['per_token_latency_ms']:.1f} | {g['measured_ratio']:.2f} | "
                   f"{g['predicted_ratio']:.2f} | {100 * g['fraction_of_predicted']:.0f}% |")
    for name, profs in s.get("profile", {}).items():
        for prof in profs if isinstance(profs, list) else [profs]:
            out += _profile_line(name, prof)
    return out


def _profile_line(name: str, prof: dict) -> list[str]:
    ops = ", ".join(f"{o['op'].removeprefix('aten::')} {100 * o['share']:.0f}%"
                    for o in prof["top_ops"][:6])
    return ["", f"Profile, {name}, batch {prof['batch']}, context {prof['context']} "
            f"({prof['total_self_cpu_ms_per_step']:.0f} ms self CPU per step): {ops}"]


def long_table(s: dict) -> list[str]:
    ref = s["llama_cpp_reference"]
    out = [f"### Long context ({_load(s)})", "",
           "| batch | context | hybrid tok/s | twin tok/s | ratio | predicted (f32 state) | "
           "llama.cpp hybrid / twin |", "|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        cpp = ref.get(f"batch_{r['batch']}_tok_s")
        cpp_text = f"{cpp['hybrid']} / {cpp['twin']}" if cpp else "-"
        out.append(f"| {r['batch']} | {r['context']} | {r['hybrid']['tok_s']:.1f} | "
                   f"{r['twin']['tok_s']:.1f} | {r['measured_ratio']:.2f} | "
                   f"{r['predicted']['exact_state_float32']:.2f} | {cpp_text} |")
    return out


def batched_table(s: dict) -> list[str]:
    out = [f"### Batched generation, hybrid ({_load(s)})", "",
           "| runner | batch | Mamba state | prompts | output tok/s (wall) | decode-only tok/s |",
           "|---|---|---|---|---|---|"]
    for e in s["engine"]:
        out.append(f"| bamba LLM.generate (compile {e['compile']}) | {e['batch']} | "
                   f"{e['state_dtype']} | {e['prompts']} | "
                   f"{e['tok_s']:.1f} | {e['decode_only_tok_s']:.1f} |")
    hf = s["transformers"]
    out.append(f"| transformers {hf['transformers']} generate | {hf['batch']} | - | {hf['prompts']} "
               f"| {hf['tok_s']:.1f} | {hf['decode_only_tok_s']:.1f} |")
    for run, ratio in s["speedup_vs_transformers"].items():  # run: "compile/state dtype"
        out += ["", f"bamba ({run}) / transformers at batch {hf['batch']}: {ratio:.1f}x over "
                f"whole calls, {s['decode_speedup_vs_transformers'][run]:.1f}x on decode steps"]
    return out


def prefix_table(s: dict) -> list[str]:
    return [f"### Prefix cache ({_load(s)})", "",
            f"TTFT with a {s['prefix_len']}-token prefix + {s['suffix_len']}-token suffix: "
            f"uncached {s['uncached_median_s']:.3f} s, cached {s['cached_median_s']:.3f} s "
            f"(medians; cached = {100 * s['cached_over_uncached']:.0f}% of uncached)."]


def render(data: dict) -> str:
    parts = []
    for key, fn in (("context", context_tables), ("long", long_table),
                    ("batched", batched_table), ("prefix", prefix_table)):
        if key in data:
            parts += fn(data[key]) + [""]
    return "\n".join(parts)


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    print(render(json.loads(path.read_text())))
