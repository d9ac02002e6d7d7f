"""Condenses ptxas -v output (from a build log on stdin) to one line per kernel and architecture.

Prints `arch  registers  stack  spill-stores  spill-loads  kernel` and a closing total; exits 1
when any kernel has a stack frame, spills, or a local-memory warning, so a log with spills fails.
"""

import re
import subprocess
import sys

ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")


def demangle(names: list[str]) -> list[str]:
    try:
        result = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True,
                                text=True, check=True)
        return result.stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def main() -> int:
    rows, current, local_memory_warnings = [], None, 0
    for line in sys.stdin:
        if (match := ENTRY.search(line)):
            current = {"kernel": match.group(1), "arch": match.group(2)}
            rows.append(current)
        elif current is not None and (match := FRAME.search(line)):
            current["frame"], current["stores"], current["loads"] = map(int, match.groups())
        elif current is not None and (match := USED.search(line)):
            current["registers"] = int(match.group(1))
        lowered = line.lower()
        if "warning" in lowered and ("local memory" in lowered or "lmem" in lowered):
            local_memory_warnings += 1
    names = demangle([row["kernel"] for row in rows])
    bad = 0
    print(f"{'arch':<6} {'regs':>4} {'stack':>5} {'spill st':>8} {'spill ld':>8}  kernel")
    for row, name in zip(rows, names):
        frame, stores, loads = row.get("frame", 0), row.get("stores", 0), row.get("loads", 0)
        bad += frame + stores + loads > 0
        short = re.sub(r"solo_fast::\(anonymous namespace\)::", "", name)
        print(f"{row['arch']:<6} {row.get('registers', 0):>4} {frame:>5} {stores:>8} {loads:>8}  "
              f"{short[:120]}")
    print(f"ptxas: {len(rows)} kernel builds, {bad} with stack/spills, "
          f"{local_memory_warnings} local-memory warnings")
    return 1 if bad or local_memory_warnings else 0


if __name__ == "__main__":
    sys.exit(main())
