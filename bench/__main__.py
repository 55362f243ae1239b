"""Command line: ``python -m bench all | list | show | SCENARIO ... [--runs N] [--messages N] [--quick]``."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType

from bench import report
from bench.registry import SCENARIOS
from bench.runner import run_scenario
from bench.scenarios import PENDING

QUICK_RESULTS_PATH = report.RESULTS_PATH.with_name("quick.json")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Postroom benchmarks: scenarios against smtp-sink, peers side by side.",
        epilog="Scenarios: " + ", ".join(SCENARIOS) + ". 'all' runs them in that order; "
        "'list' describes them; 'show' prints the stored table.",
    )
    p.add_argument(
        "targets", nargs="+", metavar="SCENARIO", help="scenario names, 'all', 'list' or 'show'"
    )
    p.add_argument(
        "--runs",
        type=int,
        default=3,
        help="runs per scenario; the table shows the median (default 3)",
    )
    p.add_argument(
        "--messages", type=int, default=None, help="message count for every selected scenario"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small counts for a smoke run (written to results/quick.json)",
    )
    p.add_argument(
        "--timeout", type=float, default=None, metavar="S", help="time budget of one run in seconds"
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="sinks dump every message and each recipient is checked "
        "(slower: results go to results/verify.json)",
    )
    p.add_argument(
        "--max-others",
        type=float,
        default=15.0,
        metavar="PCT",
        help="repeat a run if other processes used more than PCT%% of the CPUs during it (default 15)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="how often a disturbed run is repeated; the least disturbed attempt is kept (default 2)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        metavar="S",
        help="before each run, wait up to S seconds for the machine to be <25%% busy (default 30; 0: don't)",
    )
    p.add_argument(
        "--output", type=Path, default=None, help="results file (default bench/results/latest.json)"
    )
    return p


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Unwind normally so every run's finally-blocks stop the processes it started.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = _parser().parse_args(argv)
    default_output = report.RESULTS_PATH
    if args.verify:
        default_output = report.RESULTS_PATH.with_name("verify.json")
    elif args.quick:
        default_output = QUICK_RESULTS_PATH
    output = args.output or default_output
    if args.targets == ["list"]:
        for sc in SCENARIOS.values():
            print(f"{sc.name:20} {sc.messages:>9,} msgs  {sc.description}")
        for name in PENDING:
            print(f"{name:20} {'':>9}       pending (Postroom)")
        return 0
    if args.targets == ["show"]:
        data = report.load(output)
        names = [*SCENARIOS, *(n for n in data["scenarios"] if n not in SCENARIOS)]
        print(report.markdown_table(data["scenarios"], [*names, *PENDING], pending=PENDING))
        return 0
    names = list(SCENARIOS) if args.targets == ["all"] else args.targets
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        _parser().error(
            f"unknown scenario(s): {', '.join(unknown)} (known: {', '.join(SCENARIOS)})"
        )
    if args.runs < 1:
        _parser().error("--runs must be at least 1")

    results = []
    for name in names:
        results.append(
            run_scenario(
                SCENARIOS[name],
                runs=args.runs,
                messages=args.messages,
                quick=args.quick,
                timeout_s=args.timeout,
                quiet_wait_s=args.quiet_wait,
                verify=args.verify,
                max_others_pct=args.max_others,
                retries=args.retries,
            )
        )
        report.merge_and_write(output, results)  # after each scenario: a later crash keeps it
    data = report.load(output)
    print()
    print(report.markdown_table(data["scenarios"], names, now=names))
    print(f"\nresults: {output}")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
