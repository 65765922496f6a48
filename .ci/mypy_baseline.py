"""
Compare mypy's output (on stdin) with a baseline of known errors.

An error is its file, message and code, without the line number, counted:
the check fails when an error occurs more often than the baseline allows.
Usage: mypy koboldfs | python .ci/mypy_baseline.py BASELINE [--update]
"""

import re
import sys
from collections import Counter

ERROR = re.compile(r"^(?P<file>[^:]+):\d+(?::\d+)?: error: (?P<rest>.*)$")


def errors(lines):
    found = Counter()
    for line in lines:
        match = ERROR.match(line.rstrip("\n"))
        if match:
            found[f"{match['file']}: {match['rest']}"] += 1
    return found


def main(argv):
    path, update = argv[1], "--update" in argv[2:]
    output = sys.stdin.readlines()
    now = errors(output)
    if update:
        with open(path, "w") as f:
            for error in sorted(now.elements()):
                f.write(error + "\n")
        print(f"mypy: baseline rewritten with {sum(now.values())} errors")
        return 0
    with open(path) as f:
        known = errors(f"{line.split(': ', 1)[0]}:0: error: {line.split(': ', 1)[1]}" for line in f)
    new = now - known
    gone = known - now
    if gone:
        print(f"mypy: {sum(gone.values())} baseline errors no longer occur; `.ci/lint --update` drops them")
    if new:
        print(f"mypy: {sum(new.values())} new errors:")
        for line in output:
            match = ERROR.match(line.rstrip("\n"))
            if match and new[f"{match['file']}: {match['rest']}"] > 0:
                print("  " + line.rstrip("\n"))
        return 1
    print(f"mypy: no new errors ({sum(now.values())} known)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
