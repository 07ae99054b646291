"""Host memory of reading a large JSONL dataset: streamed (vlft/data/streaming.py) and indexed (vlft/data/formats.py).

    python recipes/bench_stream.py [--lines 1000000]

Writes a JSONL file of short chat records, then in a fresh process per mode reads every record and reports the peak
resident memory growth over the process's memory before reading, and the records per second. The streamed read
keeps one record at a time; the indexed read keeps the file as a memory-mapped Arrow table, so neither grows with
the file the way a Python list of its lines would (shown as the third mode for reference).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import tempfile
import time
from pathlib import Path


def _write(path: Path, lines: int) -> None:
    with open(path, "w") as f:
        for i in range(lines):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"question {i}: what is shown?"},
                                             {"role": "assistant", "content": f"answer number {i}"}]}) + "\n")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _read(mode: str, path: str, out) -> None:
    import datasets  # noqa: F401  (imported before measuring: its own size is not the data's)

    from vlft.data.formats import RecordSource, quiet_datasets

    before = _rss_mb()
    start = time.perf_counter()
    n = 0
    if mode == "streamed":
        for _ in RecordSource(path, streaming=True):
            n += 1
    elif mode == "indexed":
        with quiet_datasets():
            source = RecordSource(path)
        for i in range(len(source)):
            source.get(i)
            n += 1
    else:  # what vlft no longer does: the whole text column as a Python list
        with open(path) as f:
            lines = [json.loads(line) for line in f]
        n = len(lines)
    out.put((mode, n, _rss_mb() - before, n / (time.perf_counter() - start)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="vlft-bench-stream-"))
    path = folder / "large.jsonl"
    _write(path, args.lines)
    size_mb = path.stat().st_size / 2**20
    print(f"{args.lines:,} lines, {size_mb:.0f} MB of JSONL; peak RSS growth while reading every record, in a fresh "
          "(spawned) process per mode")
    ctx = mp.get_context("spawn")  # never fork a process whose torch thread pool may have started
    for mode in ("streamed", "indexed", "python list"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_read, args=(mode, str(path), queue))
        proc.start()
        name, n, grown, rate = queue.get()
        proc.join()
        print(f"  {name:<12} {n:>10,} records  peak RSS +{grown:7.0f} MB ({grown / size_mb:4.2f}x the file)  "
              f"{rate:>9,.0f} records/s")
    os.remove(path)
    os.rmdir(folder)


if __name__ == "__main__":
    main()
