"""Parses Prometheus text exposition from stdin with the reference Python parser and prints
every sample as JSON: [{"name": ..., "labels": {...}, "value": ...}, ...]. A malformed
exposition makes the parser raise, and this script exit non-zero."""

import json
import sys

from prometheus_client.parser import text_string_to_metric_families

samples = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for sample in family.samples:
        samples.append({"name": sample.name, "labels": sample.labels, "value": sample.value})
print(json.dumps(samples))
