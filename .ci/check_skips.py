"""Print every skipped test of a pytest run and fail on a skip .ci/allowed_skips.txt does not allow.

    python .ci/check_skips.py JUNIT_XML [ALLOWED_SKIPS]

Reads the run's JUnit XML (``pytest --junitxml``: one ``<skipped message=...>`` per skipped
case, the reason whole, where the terminal summary may cut it). Exit status: 0 every skip is
allowed, 1 some are not (or the file lists no test at all), 2 a malformed rule.
"""
from __future__ import annotations

import platform
import re
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
RULE = re.compile(r"^(?P<machine>[\w-]+):\s*(?P<regex>.*?)\s+#\s+(?P<why>.+)$")


def load_rules(path: Path, machine: str) -> list[tuple[re.Pattern, str]]:
    rules = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = RULE.match(line.strip())
        if not m:
            raise ValueError(f"{path}:{n}: expected 'MACHINE: REGEX  # why', got {line.strip()!r}")
        try:
            regex = re.compile(m["regex"])
        except re.error as e:
            raise ValueError(f"{path}:{n}: bad regular expression ({e})") from None
        if m["machine"] in ("any", machine):
            rules.append((regex, m["why"]))
    return rules


def skipped_cases(junit: Path) -> tuple[int, list[tuple[str, str]]]:
    """(number of test cases, [(test id, skip reason)])."""
    root = ET.parse(junit).getroot()
    cases = list(root.iter("testcase"))
    out = []
    for case in cases:
        skip = case.find("skipped")
        if skip is None or skip.get("type") == "pytest.xfail":
            continue
        reason = skip.get("message", "")
        reason = re.sub(r"^Skipped: ", "", reason)  # pytest.skip() inside a test
        out.append((f"{case.get('classname', '')}::{case.get('name', '')}", reason))
    return len(cases), out


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    machine = platform.machine()
    try:
        rules = load_rules(Path(argv[1]) if len(argv) > 1 else HERE / "allowed_skips.txt", machine)
    except ValueError as e:
        print(f"check_skips: {e}", file=sys.stderr)
        return 2
    total, skips = skipped_cases(Path(argv[0]))
    if total == 0:
        print("check_skips: the JUnit file lists no test case", file=sys.stderr)
        return 1
    by_reason: dict[str, list[str]] = defaultdict(list)
    for test, reason in skips:
        by_reason[reason].append(test)
    bad = 0
    print(f"skipped: {len(skips)} of {total} test cases on {machine}")
    for reason, tests in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        why = next((w for r, w in rules if r.search(reason)), None)
        if why is None:
            bad += len(tests)
        print(f"  {'allowed' if why else 'NOT ALLOWED'} x{len(tests)}: {reason}")
        more = " ..." if len(tests) > 5 else ""
        print(f"      {'why: ' + why if why else 'tests: ' + ', '.join(tests[:5]) + more}")
    if bad:
        print(f"check_skips: {bad} skipped test cases are not in .ci/allowed_skips.txt: install what they need "
              "(.ci/run's apt list) or, if the skip is legitimate everywhere, add a rule with its reason",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
