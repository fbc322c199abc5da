"""Prints the median of each figure per label from loadgen JSON lines."""
import json
import statistics
import sys
from collections import defaultdict

FIELDS = ["delivered_per_sec", "published_per_sec", "p50_us", "p99_us", "p999_us",
          "msgs_per_frame", "connect_per_sec", "rss_per_conn", "sock_mem_per_conn",
          "slab_per_conn", "server_cpu_pct", "server_rss_peak", "errors"]

runs = defaultdict(list)
for line in open(sys.argv[1]):
    line = line.strip()
    if line.startswith("{"):
        r = json.loads(line)
        runs[r["label"]].append(r)

print(f"{'label':40} {'n':>2} " + " ".join(f"{f:>17}" for f in FIELDS))
for label, rs in runs.items():
    cells = []
    for f in FIELDS:
        vals = [r[f] for r in rs if r.get(f) is not None]
        cells.append(f"{statistics.median(vals):17.1f}" if vals else f"{'-':>17}")
    print(f"{label:40} {len(rs):>2} " + " ".join(cells))
