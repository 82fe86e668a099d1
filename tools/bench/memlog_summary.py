"""Summary of a cubecl memory log (burn's CUDA allocator, `[memory.logger] level = "full"` in a `cubecl.toml` in the
working directory): which request made each new page of the pool, how large the pools' reservation grew, and the
pools' pages at the end. Used by `gpu_run.sh memlog` to find where the reservation exceeds what is in use.

    python tools/bench/memlog_summary.py mem.log [--min-mb 100] [--memory "Pinned CPU Memory"]
"""
import argparse
import re
from collections import Counter

UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
SIZE = r"([0-9.]+) ([KMGT]?B)"


def parse_size(number, unit):
    return float(number) * UNITS[unit]


def parse(path, memory="Main GPU Memory"):
    """The new-page events of `memory`'s allocator in the log (cubecl keeps one for device memory and one for the
    pinned host memory it stages reads through, both printed to the same log, each line of theirs prefixed with the
    name): the request that made each page, and the pools' state printed with it."""
    last_request, counts, events, event, section = None, Counter(), [], None, None
    ours = True
    with open(path, errors="replace") as f:
        for line in f:
            m = re.match(r"\[([^\]]+)\]", line)
            if m:
                ours = m.group(1) == memory
            if not ours:
                continue
            m = re.search(r"Reserved memory " + SIZE + r" using (dynamic pool|persistent memory)", line)
            if m:
                last_request = parse_size(m.group(1), m.group(2))
                counts[m.group(3)] += 1
                event = None
                continue
            if "Allocated a new memory page" in line:
                event = {"request": last_request, "pools": [], "persistent": {}, "total": {}}
                events.append(event)
                section = None
                continue
            if event is None:
                continue
            if "## Persistent" in line:
                section = event["persistent"]
            elif "## Summary" in line:
                section = event["total"]
            elif (m := re.search(r"Sliced Pool page_size=" + SIZE, line)):
                section = {"page": parse_size(m.group(1), m.group(2)), "pages": 0}
                event["pools"].append(section)
            elif re.match(r"\s+- Page ", line) and section is not None:
                section["pages"] = section.get("pages", 0) + 1
            elif (m := re.search(r"Bytes in use: " + SIZE, line)) and section is not None:
                section["in_use"] = parse_size(m.group(1), m.group(2))
            elif (m := re.search(r"Total bytes reserved: " + SIZE, line)) and section is not None:
                section["reserved"] = parse_size(m.group(1), m.group(2))
    return counts, events


def gb(d, key):
    return d.get(key, 0) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("--min-mb", type=float, default=100.0, help="list new pages made by requests at least this large")
    ap.add_argument("--memory", default="Main GPU Memory",
                    help='the allocator to summarize ("Pinned CPU Memory": the host staging buffers)')
    args = ap.parse_args()
    counts, events = parse(args.log, args.memory)
    print(f"requests: {counts['dynamic pool']} dynamic, {counts['persistent memory']} persistent; "
          f"new pages: {len(events)}")
    sizes = Counter(round((e["request"] or 0) / 1e6, 1) for e in events)
    print("new pages by the size of the request that made them (largest 25):")
    for size, n in sorted(sizes.items(), reverse=True)[:25]:
        print(f"  {size:9.1f} MB x{n}")
    print(f"new pages made by requests >= {args.min_mb} MB, in order (GB reserved / in use after):")
    for i, e in enumerate(events):
        if (e["request"] or 0) >= args.min_mb * 1e6:
            print(f"  #{i:4} request {(e['request'] or 0) / 1e6:9.1f} MB -> {gb(e['total'], 'reserved'):7.2f} / "
                  f"{gb(e['total'], 'in_use'):7.2f}")
    if events:
        last = events[-1]
        print(f"at the last new page: reserved {gb(last['total'], 'reserved'):.2f} GB, in use "
              f"{gb(last['total'], 'in_use'):.2f} GB; persistent {gb(last['persistent'], 'reserved'):.2f} GB "
              f"reserved, {gb(last['persistent'], 'in_use'):.2f} GB in use")
        for pool in last["pools"]:
            print(f"  pool of {pool['page'] / 1e6:10.1f} MB pages: {pool.get('pages', 0):3} pages, reserved "
                  f"{gb(pool, 'reserved'):6.2f} GB, in use {gb(pool, 'in_use'):6.2f} GB")


if __name__ == "__main__":
    main()
