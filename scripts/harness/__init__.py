"""The harness that `scripts/bench.py` and `scripts/bench_shared_limits.py` measure with.

    runtime  BenchError, the run's time Budget, the hard alarm, how a script ends
    client   the load generator's HTTP/1.1 clients: raw asyncio protocol, or aiohttp's
    machine  /proc readings (CPU time, RSS, listen drops), CPU pinning, ports, processes
    stack    the fake upstream and the gateway as processes, with the services beside them
    load     the calls, closed-loop fixed-duration runs, and their retries on a busy machine
    report   percentiles, number formats, text and Markdown tables, the markers

Importing it puts the repository on sys.path, for `gateway` and `tests`.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
