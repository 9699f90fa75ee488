#!/usr/bin/env python3
"""The code a request runs: how many distinct 64-byte cache lines and 4 KiB pages it spans.

  footprint.py DUMP REQUESTS
      DUMP is a callgrind output file written with --dump-instr=yes over REQUESTS requests. Prints
      "<lines> <pages>": the instruction cache lines and the pages holding an instruction that was
      executed at least once a request on average, over every object (the program and its shared
      libraries). Code that runs more rarely (a timer, a periodic health probe, a pool growing) is
      left out.

A request whose code is spread over many lines and pages pays for it when other processes have
run since its last turn and the caches and TLBs no longer hold that code: the instruction count
leaves that cost out, and these two figures are its measure.

The format is callgrind's (valgrind's docs, "Callgrind Format Specification"): a cost line starts
with its positions, the instruction address first, each either absolute, `+N`/`-N` relative to
the same position on the cost line before, or `*` for the same, and then the events (Ir first);
the line after `calls=` carries the call's inclusive cost, not its site's.
"""

import sys
from collections import Counter


def executions(path):
    """How many times each instruction address ran."""
    counts = Counter()
    last = 0
    call_cost = False
    with open(path) as dump:
        for line in dump:
            if line.startswith("positions:"):
                if line.split()[1:2] != ["instr"]:
                    sys.exit(f"{path}: written without --dump-instr=yes ({line.strip()})")
                continue
            if line.startswith("calls="):
                call_cost = True
                continue
            first = line[:1]
            if not (first.isdigit() or first in "+-*"):
                continue
            fields = line.split()
            position = fields[0]
            if position == "*":
                address = last
            elif first in "+-":
                step = int(position[1:], 0)
                address = last + step if first == "+" else last - step
            else:
                address = int(position, 0)
            last = address
            if call_cost:
                call_cost = False
            elif len(fields) > 2:
                counts[address] += int(fields[2])
    return counts


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    requests = int(sys.argv[2])
    hot = [address for address, count in executions(sys.argv[1]).items() if count >= requests]
    lines = {address >> 6 for address in hot}
    pages = {address >> 12 for address in hot}
    print(f"{len(lines)} {len(pages)}")


if __name__ == "__main__":
    main()
