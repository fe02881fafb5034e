"""Run every benchmark and assemble `benchmarks/RESULTS.md`.

    python benchmarks/run_all.py                      # all of them on SmolLM2 (hours: quality.py has three budgets)
    python benchmarks/run_all.py --only speedup       # some of them; RESULTS.md still shows all
    python benchmarks/run_all.py --assemble-only      # rebuild RESULTS.md from results/*.md, *.json
    python benchmarks/run_all.py --smoke              # every script's --smoke mode, into a temp dir

Each script runs in its own process (`python benchmarks/<name>.py [--smoke] --out DIR`)
with its output in `DIR/<name>.log`; one failing does not stop the others, and the exit
status says whether all succeeded. RESULTS.md gathers the commands, the date, the
machine, every table and a summary of the targets, each read from the scripts' own
`<name>.md` / `<name>.json` (so partial re-runs keep the other sections).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SCRIPTS = ("quality", "recipes", "memory", "overhead", "speedup")
# Benchmarks written by other parts of the project; linked from RESULTS.md when present.
OTHER_RESULTS = {
    "export_memory.md": "peak memory of the streamed export (`benchmarks/export_memory.py`)",
    "estimator_validation.md": "memory/time estimator against measurements (`benchmarks/validate_estimator.py`)",
    "estimates.md": "estimated resources for large models",
    "oracle_ranking.md": "criteria against a brute-force oracle ranking",
}
TIMINGS = "run_all.json"


def start_script(name: str, out: Path, smoke: bool, extra: list[str]) -> tuple:
    command = [sys.executable, str(common.ROOT / "benchmarks" / f"{name}.py"), "--out", str(out)]
    command += (["--smoke"] if smoke else []) + extra
    env = {**os.environ, "PYTHONPATH": str(common.ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = open(out / f"{name}.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=common.ROOT)
    return process, log, time.perf_counter(), command


def finish_script(name: str, started: tuple, out: Path) -> dict:
    process, log, start, command = started
    rc = process.wait()
    log.close()
    seconds = time.perf_counter() - start
    print(f"{name}: rc {rc}, {seconds / 60:.1f} min (log: {out / f'{name}.log'})", file=sys.stderr, flush=True)
    shown = ["python", f"benchmarks/{name}.py"] + [a for a in command[2:] if a not in ("--out", str(out))]
    return {"rc": rc, "seconds": seconds, "command": " ".join(shown)}


def run_scripts(names: list[str], out: Path, smoke: bool, extra: list[str], jobs: int) -> dict:
    """Run the scripts, `jobs` at a time (full runs: 1, so timings never share the CPU)."""
    results, running, queue = {}, {}, list(names)
    while queue or running:
        while queue and len(running) < jobs:
            name = queue.pop(0)
            running[name] = start_script(name, out, smoke, extra)
        done = [name for name, started in running.items() if started[0].poll() is not None]
        for name in done:
            results[name] = finish_script(name, running.pop(name), out)
        if not done:
            time.sleep(0.5)
    return results


def _load(out: Path, name: str) -> tuple[str | None, dict | None]:
    md, js = out / f"{name}.md", out / f"{name}.json"
    return (md.read_text() if md.exists() else None), (json.loads(js.read_text()) if js.exists() else None)


def _section(markdown: str) -> str:
    """A script's report as a RESULTS.md section: headings one level down."""
    lines = []
    for line in markdown.strip().splitlines():
        lines.append("#" + line if line.startswith("#") else line)
    return "\n".join(lines)


def target_rows(out: Path) -> list[list[str]]:
    rows = []
    for name in ("quality", "recipes"):
        _, data = _load(out, name)
        if data:
            rows += [[name, target, measured, result] for target, measured, result in data.get("targets", [])]
    _, memory = _load(out, "memory")
    if memory:
        for name, ratio in memory.get("ratios", {}).items():
            measured = (f"lora 8-bit {ratio['lora_8bit_over_baseline'] / common.MIB:.0f} MiB vs taylor fp32 "
                        f"{ratio['taylor_fp32_over_baseline'] / common.MIB:.0f} MiB over baseline = "
                        f"{ratio['ratio_over_baseline']:.0%}")
            rows.append(["memory", f"lora (8-bit) peak <= 40% of taylor (fp32) peak, {name} activation "
                         "checkpointing", measured, "met" if ratio["met"] else "**missed**"])
    _, overhead = _load(out, "overhead")
    if overhead:
        for r in overhead["results"]:
            rows.append(["overhead", f"scoring <= 10% per optimizer step ({r['base']} base)",
                         f"{r['plain']['median']:.2f} s -> {r['hfprune']['median']:.2f} s = {r['overhead']:+.1%}",
                         "met" if overhead["met"][r["base"]] else "**missed**"])
    _, speedup = _load(out, "speedup")
    if speedup:
        for r in speedup["rows"]:
            if r["name"] == "dense":
                continue
            rows.append(["speedup", f"prefill >= 90% of the FLOPs limit ({r['name']})",
                         f"{r['prefill_speedup']:.2f}x of {r['prefill_limit']:.2f}x = {r['prefill_ratio_of_limit']:.0%}",
                         "met" if speedup["met"][r["name"]] else "**missed**"])
    return rows


def assemble(out: Path, destination: Path, smoke: bool, timings: dict) -> Path:
    info = common.machine()
    present = {name: _load(out, name)[0] for name in SCRIPTS}
    lines = [
        "# hfprune benchmark results" + (" (smoke run: numbers mean nothing)" if smoke else ""),
        "",
        "Regenerate: `python benchmarks/run_all.py` (or `make bench`); one benchmark: "
        "`python benchmarks/<name>.py`; every script has `--smoke` (tiny random model, seconds), which "
        "`tests/test_benchmarks.py` runs. Numbers below come from the scripts' own reports in "
        "`benchmarks/results/<name>.md` (raw values in `<name>.json`).",
        "",
        f"Assembled: {info['date']}. Machine: {info['cpu']}, **{info['cores']} CPU cores**, "
        f"{info.get('memory_gib', '?')} GiB RAM, no GPU, shared with other jobs (load average "
        f"{info['load_average'][0]:.1f} when assembled); torch {info['torch']}, transformers "
        f"{info.get('transformers')}, peft {info.get('peft')}, bitsandbytes {info.get('bitsandbytes')}, "
        f"torch-pruning {info.get('torch_pruning', 'not installed')}. Model: SmolLM2-135M-Instruct "
        "(30 layers, 9 query heads, 3 KV heads, head_dim 64, MLP 1536), the offline conversion of "
        "`hfprune.offline`.",
        "",
        "| benchmark | command | wall time | status |",
        "|---|---|---:|---|",
    ]
    for name in SCRIPTS:
        timing = timings.get(name)
        if timing:
            status = "ok" if timing["rc"] == 0 else f"**failed (rc {timing['rc']})**"
            lines.append(f"| {name} | `{timing['command']}` | {timing['seconds'] / 60:.1f} min | {status} |")
        elif present[name]:
            command = next((l.split("`")[1] for l in present[name].splitlines() if l.startswith("Command:")), "?")
            lines.append(f"| {name} | `{command}` | see its report | ok |")
        else:
            lines.append(f"| {name} | `python benchmarks/{name}.py` | - | **not run** |")
    lines += ["", "## Targets", "", common.table(["benchmark", "target", "measured", "result"],
                                                 target_rows(out), "llll"), ""]
    for name in SCRIPTS:
        if present[name]:
            lines += [_section(present[name]), ""]
    others = [f"- [`results/{file}`](results/{file}): {what}" for file, what in OTHER_RESULTS.items()
              if (out / file).exists()]
    if others:
        lines += ["## Other measurements", ""] + others + [""]
    destination.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {destination}", file=sys.stderr)
    return destination


def main(argv=None) -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=SCRIPTS, default=list(SCRIPTS))
    p.add_argument("--assemble-only", action="store_true", help="no runs: rebuild RESULTS.md from the outputs")
    p.add_argument("--jobs", type=int, default=None,
                   help="scripts run at the same time (default 1; --smoke: 2, its numbers mean nothing anyway)")
    args = p.parse_args(argv)
    out = common.output_dir(args)
    destination = (out / "RESULTS.md") if (args.smoke or args.out) else common.ROOT / "benchmarks" / "RESULTS.md"
    timings_path = out / TIMINGS
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    failed = []
    if not args.assemble_only:
        extra = ["--threads", str(args.threads)] if "--threads" in (argv or sys.argv) else []
        jobs = args.jobs or (2 if args.smoke else 1)
        ran = run_scripts([name for name in SCRIPTS if name in args.only], out, args.smoke, extra, jobs)
        timings.update(ran)
        timings_path.write_text(json.dumps(timings, indent=2) + "\n")
        failed = [name for name, timing in ran.items() if timing["rc"]]
    assemble(out, destination, args.smoke, timings)
    if failed:
        print(f"failed: {', '.join(failed)} (see their logs in {out})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
