"""A bounded fuzz: random and mutated latents files and batch configs through the CLI (tests/fuzz.py), under an
address-space limit (2 GiB beyond what the worker's imports took). Every case ends with exit 0 or 2, no traceback,
no ffmpeg left, nothing written but its outputs on success and nothing at all on refusal, and no allocation beyond
the limit (it would surface as exit 1 or a traceback). The seed is fixed; VAEPIPE_FUZZ_SEED and VAEPIPE_FUZZ_CASES
run others, such as a long soak."""

import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a seeded fuzz of 60 cases, each its own process

ROOT = Path(__file__).resolve().parents[1]
HEADROOM_GIB = 2  # the cases' share of address space: a tiny decode with ffmpeg beside it needs well under 1 GiB
SEED = int(os.environ.get("VAEPIPE_FUZZ_SEED", 13))
CASES = int(os.environ.get("VAEPIPE_FUZZ_CASES", 60))


def test_fuzzed_latents_and_configs_exit_0_or_2_cleanly_under_a_memory_ceiling(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "fuzz.py"), str(SEED), str(CASES), str(tmp_path),
                          str(HEADROOM_GIB)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "address-space limit" in run.stderr, run.stderr[-4000:]
    results = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(results) == CASES
    bad = []
    for r in results:
        ok = r["code"] in (0, 2) and not r["traceback"] and not r["stray"] and not r["ffmpeg"]
        ok = ok and not (r["code"] == 2 and (r["new"] or r["changed"]))  # refused: nothing written, nothing touched
        ok = ok and not [p for p in r["changed"] if not p.startswith(("batch.manifest", "m/"))]  # inputs never change
        if not ok:
            bad.append(r)
    assert not bad, json.dumps(bad[:3], indent=1)
    # The loop reaches both ends: files and configs that work, and ones refused for many different reasons.
    codes = collections.Counter((r["kind"], r["code"]) for r in results)
    assert codes[("decode_case", 0)] >= 5 and codes[("decode_case", 2)] >= 20, codes
    assert codes[("batch_case", 0)] + codes[("batch_case", 2)] >= 5, codes
    messages = [" ".join(r["output"].split()) for r in results if r["code"] == 2]
    reasons = {re.sub(r"'[^']*'|/\S+|[\d.]+", "", message)[:60] for message in messages}
    assert len(reasons) >= 15, reasons
