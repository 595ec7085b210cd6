"""The speed benchmark's JSON as markdown tables, ready to paste into docs/performance.md."""

from typing import Any


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown(data: dict[str, Any]) -> str:
    meta, flops, comp = data["meta"], data["flops"], data["components"]
    size = meta["size"]
    parts = [
        f"**{meta['model']}** architecture on **{meta['device']}**, {meta['dtype']}, "
        f"{size}x{size}, torch {meta['torch']}, diffusers {meta['diffusers']}, {meta['date']}. "
        f"Timed at {meta['steps_timed']} steps (caches at their own count) and scaled to 50: "
        "s/image = text encode + VAE decode + 50 x s/step.",
    ]
    rows = data["rows"]
    baseline = next((r for r in rows if r["config"].startswith("diffusers")), None)
    floor = flops.get("floor_s_per_image")
    table = []
    for r in rows:
        speedup = baseline["seconds_per_image"] / r["seconds_per_image"] if baseline else None
        table.append(
            [
                r["config"],
                r["lossless"],
                r["seconds_per_image"],
                r["seconds_per_step"],
                f"{speedup:.2f}x" if speedup else None,
                f"{r['seconds_per_image'] / floor:.2f}" if floor else None,
                r["peak_vram_gib"],
                r["note"],
            ]
        )
    header = ["configuration", "lossless", "s/image (50 steps)", "s/step", "vs __call__"]
    header += ["x floor", "peak VRAM GiB", "note"]
    parts.append(_table(header, table) if table else "(No lever rows in this run.)")
    if comp:
        parts.append(
            _table(
                ["text encode s", "VAE decode s", "forward batch 1 s", "forward batch 2 s"],
                [
                    [
                        round(comp["text_encode_s"], 4),
                        round(comp["vae_decode_s"], 4),
                        round(comp["forward_batch1_s"], 4),
                        round(comp["forward_batch2_s"], 4),
                    ]
                ],
            )
        )
    if flops:
        parts.append(
            f"FLOPs: {flops['tflop_per_forward']} TFLOP per forward ({flops['tokens']} tokens; "
            f"counted {flops['counted_tflop_per_forward']}, of which attention "
            f"{flops['counted_attention_tflop']}, replaced by {flops['attention_by_hand_tflop']} "
            f"counted by hand), {flops['pflop_per_image']} PFLOP per image with guidance. "
            f"Matmul measured at {flops['matmul_tflops_measured']} TFLOP/s, so the floor is "
            f"{flops['floor_s_per_image']} s/image; one batch-1 forward runs at "
            f"{flops['forward_batch1_x_floor']}x its floor."
        )
    if data["compile"]:
        parts.append("Compile: " + ", ".join(f"{k} {v}" for k, v in data["compile"].items()) + ".")
    if data["memory"]:
        parts.append(
            _table(
                ["memory mode", "peak VRAM GiB", "s for 1 step + encode + decode"],
                [[m["mode"], m["peak_vram_gib"], m["seconds_1_step"]] for m in data["memory"]],
            )
        )
    if data.get("budgets"):
        parts.append(_budgets_table(data["budgets"]))
    if data.get("threads"):
        parts.append(
            _table(
                ["image", "steps", "images/min, 1 thread", "images/min, 2 threads", "2 vs 1"],
                [
                    [
                        f"{t['size']}x{t['size']}",
                        t["steps"],
                        t["images_per_min_1"],
                        t["images_per_min_2"],
                        f"{t['two_vs_one']}x",
                    ]
                    for t in data["threads"]
                ],
            )
        )
    if data.get("compile_modes"):
        parts.append(
            _table(
                ["compile mode", "first call s", "s/image (50 steps)", "vs the service's", "error"],
                [
                    [
                        m["mode"],
                        m.get("first_call_s"),
                        m.get("seconds_per_image"),
                        f"{m['vs_service']}x" if "vs_service" in m else None,
                        m.get("error", ""),
                    ]
                    for m in data["compile_modes"]
                ],
            )
        )
    if data.get("failed"):
        parts.append("Failed: " + "; ".join(data["failed"]) + ".")
    if data["skipped"]:
        parts.append("Skipped: " + "; ".join(data["skipped"]) + ".")
    return "\n\n".join(parts) + "\n"


def _budgets_table(rows: list[dict[str, Any]]) -> str:
    header = ["OVIS_GPU_MEMORY", "plan auto picks", "compile", "plan needs GiB"]
    header += ["peak reserved GiB", "under budget", "s/image (50 steps)", "x resident", "x floor"]
    header += ["plan with OVIS_MAX_IMAGE_SIZE=2048"]
    table = [
        [
            r["budget"],
            r.get("plan", r.get("error")),
            r.get("compile"),
            r.get("plan_needs_gib"),
            r.get("peak_reserved_gib"),
            r.get("under_budget"),
            r.get("seconds_per_image"),
            f"{r['x_resident']}x" if "x_resident" in r else None,
            r.get("x_floor"),
            r.get("plan_at_max_2048"),
        ]
        for r in rows
    ]
    return _table(header, table)
