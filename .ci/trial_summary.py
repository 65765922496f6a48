"""
Read trial's output and print its result as one line, "N passed, M failed"
(then ", K skipped" when some were skipped), which is what CI looks for.

trial ends with "Ran N tests in X.XXXs" (missing when it found no test) and
then "PASSED" or "FAILED",
optionally followed by counts in any order, e.g.
"FAILED (skips=1, failures=2, errors=1, successes=40)".
passed = successes; failed = failures + errors + unexpectedSuccesses.

Usage: python3 .ci/trial_summary.py LOGFILE [passed|failed ...]
Each extra word counts one more check run outside trial (.ci/run's
benchmark smoke run) as passed or failed.
Exit status: 0 when the summary was read and at least one test ran,
1 when no test ran, 2 when there was no summary to read, 3 when some
failed.
"""

import re
import sys

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
RAN = re.compile(r"^Ran (\d+) tests? in ")
RESULT = re.compile(r"^(PASSED|FAILED)(?: \(([^)]*)\))?\s*$")
COUNT = re.compile(r"^(\w+)=(\d+)$")


def parse(text):
    """
    Return (ran, counts) from the last "Ran" line and the result line after
    it, or None when there is no such pair.
    """
    ran = None
    result = None
    for raw in text.splitlines():
        line = ANSI.sub("", raw).rstrip("\r").strip()
        m = RAN.match(line)
        if m:
            ran, result = int(m.group(1)), None
            continue
        m = RESULT.match(line)
        if m:
            counts = {}
            for item in filter(None, (m.group(2) or "").split(",")):
                c = COUNT.match(item.strip())
                if c is None:
                    return None
                counts[c.group(1)] = int(c.group(2))
            result = (m.group(1), counts)
    if result is None:
        return None
    if ran is None:
        # trial prints no "Ran" line when it found no test at all.
        ran = sum(result[1].values())
    return ran, result[1]


def summary(counts):
    passed = counts.get("successes", 0)
    failed = (
        counts.get("failures", 0) + counts.get("errors", 0) + counts.get("unexpectedSuccesses", 0)
    )
    line = f"{passed} passed, {failed} failed"
    if counts.get("skips", 0):
        line += f", {counts['skips']} skipped"
    return line, failed


def main(argv):
    with open(argv[1], encoding="utf-8", errors="replace") as f:
        parsed = parse(f.read())
    if parsed is None:
        print("trial_summary: no trial summary found in " + argv[1], file=sys.stderr)
        return 2
    ran, counts = parsed
    for extra in argv[2:]:
        name = "successes" if extra == "passed" else "failures"
        counts[name] = counts.get(name, 0) + 1
    line, failed = summary(counts)
    print(line)
    if ran == 0:
        print("trial_summary: trial ran no test", file=sys.stderr)
        return 1
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
