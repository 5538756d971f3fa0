"""``python -m bench``: every benchmark, side by side in one run; a table on stdout and
``bench/results.json``. Each figure is the median of several runs that alternate with the
other contenders' runs; every run's timing is kept in the JSON."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from typing import Any

from bench import accounts, delivery, kube, sampling, spooling
from bench.common import ROOT, load_average, machine

SAMPLING_SIZES = (10_000, 100_000)
SPOOL_RECORDS = 100_000
PERSIST_QUEUE_RECORDS = 5_000  # one fsync per put, get and ack: 100k would take many minutes
DELIVERY_RECORDS = 20_000
NAIVE_RECORDS = 1_000  # one request at a time: 20k would take over two minutes
THREADED_RECORDS = 5_000
# how many interleaved runs each contender gets; the 100k tick and the forwarder are the long ones
REPEATS = {"sampling_10k": 5, "sampling_100k": 2, "spool": 3, "delivery": 2, "kubernetes": 5}
BENCHMARKS = ("sampling", "spool", "delivery", "accounts", "kubernetes")
KUBE_PODS = 10_000
ACCOUNT_SIZES = (50, 200)  # customer accounts, each with the 17 regions enabled by default
LATENCY_ACCOUNTS, LATENCY = 20, 0.05  # the floor pays every round trip in turn: 20 accounts take ~20 s
DAEMON_ACCOUNTS = 20


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3)


def _sampling(results: dict[str, Any], rows: list[list[str]], repeats: dict[str, int]) -> None:
    small, large = SAMPLING_SIZES
    measured = sampling.run(SAMPLING_SIZES, {small: repeats["sampling_10k"], large: repeats["sampling_100k"]})
    for size in SAMPLING_SIZES:
        got = measured[size]
        agent, floor = got["agent"], got["floor"]
        label = f"{size // 1000}k"
        results[f"sampling_overhead_{label}"] = _ratio(agent.wall, floor.wall)
        results[f"sampling_overhead_cpu_{label}"] = _ratio(agent.cpu, floor.cpu)
        results[f"peak_rss_mb_{label}"] = got["memory"]["peak_mb"]
        results["raw"][f"sampling_{label}"] = {
            "volumes": size, "agent_tick": agent.as_json(), "boto3_floor": floor.as_json(),
            "memory_fresh_process": got["memory"], "pages_served": got["pages_served"]}
        rows.append([f"sampling: one tick, {label} volumes", f"{agent.wall:.2f} s", f"boto3 floor {floor.wall:.2f} s",
                     f"{results[f'sampling_overhead_{label}']:.2f}", "<= 1.2" if size == large else "",
                     f"CPU ratio {results[f'sampling_overhead_cpu_{label}']:.2f}"])
    results["sampling_growth_10k_to_100k"] = _ratio(measured[large]["agent"].wall, measured[small]["agent"].wall)
    floor_growth = _ratio(measured[large]["floor"].wall, measured[small]["floor"].wall)
    results["raw"]["sampling_floor_growth_10k_to_100k"] = floor_growth
    rows.append(["sampling: time 10k -> 100k", f"x {results['sampling_growth_10k_to_100k']:.2f}",
                 f"boto3 floor x {floor_growth:.2f}", "", "~10 (linear)", ""])
    low, high = results["peak_rss_mb_10k"], results["peak_rss_mb_100k"]  # MiB
    results["peak_rss_growth_mb_10k_to_100k"] = round(high - low, 1)
    rows.append(["memory: peak RSS of one tick, 100k", f"{high:.0f} MiB", f"10k: {low:.0f} MiB", "",
                 "< 250 MB", f"{round((high - low) * 1024 / (large - small), 2) + 0.0:+.2f} KiB/volume"])


def _spool(results: dict[str, Any], rows: list[list[str]], repeats: dict[str, int]) -> None:
    measured = spooling.run(SPOOL_RECORDS, PERSIST_QUEUE_RECORDS, repeats["spool"])
    series = measured["series"]
    agent = SPOOL_RECORDS / series["agent"].wall
    raw = SPOOL_RECORDS / series["raw_sqlite"].wall
    peer = PERSIST_QUEUE_RECORDS / series["persist_queue"].wall
    results["spool_vs_persist_queue"] = _ratio(agent, peer)
    results["spool_vs_raw_sqlite"] = _ratio(agent, raw)
    results["raw"]["spool"] = {
        "records": SPOOL_RECORDS, "persist_queue_records": PERSIST_QUEUE_RECORDS,
        "records_per_tick": spooling.PER_TICK, "lease_batch": spooling.LEASE,
        "records_per_s": {"agent": round(agent), "raw_sqlite": round(raw), "persist_queue": round(peer)},
        **{name: s.as_json() for name, s in series.items()}}
    rows.append(["spool: spool + lease + ack, records/s", f"{agent:,.0f}/s", f"persist-queue {peer:,.0f}/s",
                 f"{results['spool_vs_persist_queue']:.1f}", ">= 20", ""])
    rows.append(["", "", f"raw SQLite {raw:,.0f}/s", f"{results['spool_vs_raw_sqlite']:.2f}", ">= 0.5", ""])


def _delivery(results: dict[str, Any], rows: list[list[str]], repeats: dict[str, int]) -> None:
    for case in delivery.CASES:
        measured = delivery.run(case, DELIVERY_RECORDS, NAIVE_RECORDS, THREADED_RECORDS, repeats["delivery"])
        series = measured["series"]
        agent = DELIVERY_RECORDS / series["agent"].wall
        naive = NAIVE_RECORDS / series["naive"].wall
        cpu_ms = series["agent"].cpu / DELIVERY_RECORDS * 1000
        naive_cpu_ms = series["naive"].cpu / NAIVE_RECORDS * 1000
        prefix = "" if case is delivery.PAIGO else f"{case.name}_"  # the keys name the Paigo case
        results[f"{prefix}delivery_vs_naive"] = _ratio(agent, naive)
        results[f"{prefix}cpu_ms_per_delivered_record"] = round(cpu_ms, 3)
        per_s = {"agent": round(agent), "naive": round(naive)}
        cpu = {"agent": round(cpu_ms, 3), "naive": round(naive_cpu_ms, 3)}
        label = f"delivery ({case.name}, {delivery.LATENCY * 1000:.0f} ms/request)"
        how = f"{case.in_flight} in flight" if case.in_flight > 1 else "batches of 100, one event per naive request"
        rows.append([f"{label}, records/s", f"{agent:,.0f}/s", f"naive httpx loop {naive:,.0f}/s",
                     f"{results[f'{prefix}delivery_vs_naive']:.1f}", ">= 8" if case is delivery.PAIGO else "", how])
        compared = f"naive {naive_cpu_ms:.2f} ms"
        if "httpx_threads" in series:
            threaded = measured["threaded_records"] / series["httpx_threads"].wall
            threaded_cpu_ms = series["httpx_threads"].cpu / measured["threaded_records"] * 1000
            results[f"{prefix}delivery_vs_httpx_threads"] = _ratio(agent, threaded)
            per_s["httpx_threads"], cpu["httpx_threads"] = round(threaded), round(threaded_cpu_ms, 3)
            rows.append(["", "", f"httpx, {case.in_flight} threads, no spool {threaded:,.0f}/s",
                         f"{results[f'{prefix}delivery_vs_httpx_threads']:.2f}", "", "reference"])
            compared += f", threads {threaded_cpu_ms:.2f} ms"
        results["raw"][f"delivery_{case.name}"] = {
            "records": DELIVERY_RECORDS, "naive_records": NAIVE_RECORDS, "threaded_records": measured["threaded_records"],
            "latency_s": delivery.LATENCY, "in_flight": case.in_flight, "records_per_s": per_s,
            "cpu_ms_per_record": cpu, "server": measured["server"], **{name: s.as_json() for name, s in series.items()}}
        rows.append([f"delivery ({case.name}): client CPU per record", f"{cpu_ms:.2f} ms", compared, "", "", ""])


def _accounts(results: dict[str, Any], rows: list[list[str]], repeats: dict[str, int]) -> None:
    regions = 17
    measured = accounts.run(ACCOUNT_SIZES)
    for size in ACCOUNT_SIZES:
        got = measured[size]
        agent, floor = got["agent"], got["floor"]
        results[f"accounts_{size}_wall_ratio"] = _ratio(agent.wall, floor.wall)
        results[f"accounts_{size}_peak_rss_mb"] = got["agent_peak_mb"]
        results["raw"][f"accounts_{size}"] = {
            "accounts": size, "regions": regions, "volumes_per_region": accounts.VOLUMES,
            "agent": {"wall_s": round(agent.wall, 2), "cpu_s": round(agent.cpu, 2), "peak_rss_mb": got["agent_peak_mb"]},
            "floor": {"wall_s": round(floor.wall, 2), "cpu_s": round(floor.cpu, 2), "peak_rss_mb": got["floor_peak_mb"]},
            "agent_aws_calls": got["aws_calls"], "served_both": got["served"]}
        rows.append([f"accounts: once, {size} x {regions} regions", f"{agent.wall:.1f} s, {got['agent_peak_mb']:.0f} MiB",
                     f"botocore floor {floor.wall:.1f} s, {got['floor_peak_mb']:.0f} MiB",
                     f"{results[f'accounts_{size}_wall_ratio']:.2f}", "<= 1.2, < 300 MB" if size == 200 else "",
                     f"CPU {agent.cpu:.1f} s vs {floor.cpu:.1f} s"])
    low, high = ACCOUNT_SIZES
    growth = (measured[high]["agent_peak_mb"] - measured[low]["agent_peak_mb"]) * 1024 / ((high - low) * regions)
    results["accounts_peak_rss_growth_kib_per_target"] = round(growth, 2)
    rows.append(["accounts: peak RSS growth per target", f"{growth:+.2f} KiB", f"{low} -> {high} accounts", "", "flat", ""])

    late = accounts.run_latency(LATENCY_ACCOUNTS, LATENCY)
    results["accounts_latency_wall_ratio"] = _ratio(late["agent"].wall, late["floor"].wall)
    results["raw"]["accounts_latency"] = {"accounts": LATENCY_ACCOUNTS, "latency_s": LATENCY,
                                          "agent_wall_s": round(late["agent"].wall, 2),
                                          "floor_wall_s": round(late["floor"].wall, 2)}
    rows.append([f"accounts: once, {LATENCY_ACCOUNTS} x {regions}, {LATENCY * 1000:.0f} ms/request",
                 f"{late['agent'].wall:.1f} s", f"botocore floor {late['floor'].wall:.1f} s",
                 f"{results['accounts_latency_wall_ratio']:.2f}", "", "sampling.workers: 8"])

    daemon = accounts.run_daemon(DAEMON_ACCOUNTS, accounts.DAEMON_TICKS)
    rss = daemon["rss_mb"]
    results["accounts_daemon_rss_growth_mb_tick_10_to_100"] = round(rss[-1] - rss[9], 1)
    results["raw"]["accounts_daemon"] = {"accounts": DAEMON_ACCOUNTS, "ticks": len(rss), **daemon}
    rows.append([f"accounts: daemon, {DAEMON_ACCOUNTS} x {regions}, {len(rss)} ticks", f"RSS {rss[-1]:.0f} MiB",
                 f"after tick 10: {rss[9]:.0f} MiB", "", "flat", f"{rss[-1] - rss[9]:+.1f} MiB"])


def _kubernetes(results: dict[str, Any], rows: list[list[str]], repeats: dict[str, int]) -> None:
    got = kube.run(KUBE_PODS, repeats["kubernetes"])
    agent, floor = got["agent"], got["floor"]
    results["kubernetes_tick_overhead_10k"] = _ratio(agent.wall, floor.wall)
    results["kubernetes_peak_rss_mb_10k"] = got["memory"]["peak_mb"]
    results["raw"]["kubernetes_10k"] = {"pods": KUBE_PODS, "agent_tick": agent.as_json(), "lightkube_floor": floor.as_json(),
                                        "memory_fresh_process": got["memory"], "pages_served": got["pages_served"]}
    rows.append([f"kubernetes: one tick, {KUBE_PODS // 1000}k pods", f"{agent.wall:.2f} s",
                 f"lightkube list floor {floor.wall:.2f} s", f"{results['kubernetes_tick_overhead_10k']:.2f}", "<= 1.2",
                 f"CPU ratio {_ratio(agent.cpu, floor.cpu):.2f}"])
    rows.append([f"memory: peak RSS of one tick, {KUBE_PODS // 1000}k pods", f"{got['memory']['peak_mb']:.0f} MiB",
                 f"before the tick: {got['memory']['before_tick_mb']:.0f} MiB", "", "< 250 MB", ""])


def table(rows: list[list[str]]) -> str:
    headers = ["benchmark", "agent", "compared with", "ratio", "goal", "note"]
    widths = [max(len(x) for x in column) for column in zip(headers, *rows)]
    fmt = "  ".join(f"{{:>{w}}}" if i == 3 else f"{{:<{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*headers), "  ".join("-" * w for w in widths), *(fmt.format(*row) for row in rows)]
    return "\n".join(line.rstrip() for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=BENCHMARKS, action="append", help="run only this benchmark (repeatable)")
    parser.add_argument("--repeat", type=int, metavar="N", help="interleaved runs per contender (default: "
                        + ", ".join(f"{k} {v}" for k, v in REPEATS.items()) + ")")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results.json"), metavar="FILE")
    args = parser.parse_args(argv)
    repeats = {name: args.repeat or n for name, n in REPEATS.items()}

    from agent.telemetry import configure_logging

    configure_logging(level="warning")
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": machine(), "started_at": datetime.now(timezone.utc).isoformat(
        timespec="seconds"), "load_average_at_start": load_average(), "repeats": repeats, "raw": {}}
    rows: list[list[str]] = []
    steps = {"sampling": _sampling, "spool": _spool, "delivery": _delivery, "accounts": _accounts,
             "kubernetes": _kubernetes}
    for name in args.only or BENCHMARKS:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        steps[name](results, rows, repeats)
    results["load_average_at_end"] = load_average()
    results["wall_s"] = round(time.perf_counter() - started, 1)
    with open(args.output, "w") as out:
        json.dump(results, out, indent=2)
        out.write("\n")
    m = results["machine"]
    print(table(rows))
    print(f"\n{m['cpu']}, {m['cores']} cores, {m['memory']}, {m['os']}, Python {m['python']}, SQLite {m['sqlite']}; "
          f"load average {results['load_average_at_start'][0]} at start, {results['load_average_at_end'][0]} at end; "
          f"{results['wall_s']:.0f} s; written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
