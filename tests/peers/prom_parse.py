"""Parses a Prometheus text page with the Prometheus project's own Python parser and prints
what it found as JSON: {"FAMILY": {"type": ..., "samples": [[NAME, {LABELS}, VALUE], ...]}}.

Usage: prom_parse.py < PAGE. A page the parser rejects makes it exit non-zero with the error.
The Rust test (tests/all/ops.rs) asserts on the result.
"""

import json
import math
import sys

from prometheus_client.parser import text_string_to_metric_families

out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    out[family.name] = {
        "type": family.type,
        "samples": [[s.name, s.labels, None if math.isnan(s.value) else s.value] for s in family.samples],
    }
print(json.dumps(out))
