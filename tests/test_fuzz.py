"""A bounded fuzz: random and mutated latents files and batch configs through the CLI (tests/fuzz.py), under an
address-space limit. Every case ends with exit 0 or 2, no traceback, no ffmpeg left, nothing written but its
outputs on success and nothing at all on refusal, and no allocation beyond the limit (it would surface as exit 1 or
a traceback). The seed is fixed; VAEPIPE_FUZZ_SEED and VAEPIPE_FUZZ_CASES run others, such as a long soak."""

import collections
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 4 << 30  # address space: torch, diffusers and a tiny decode need about 2 GiB of it
SEED = int(os.environ.get("VAEPIPE_FUZZ_SEED", 13))
CASES = int(os.environ.get("VAEPIPE_FUZZ_CASES", 60))


def limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


def test_fuzzed_latents_and_configs_exit_0_or_2_cleanly_under_a_memory_ceiling(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "fuzz.py"), str(SEED), str(CASES), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=600, preexec_fn=limit_address_space)
    assert run.returncode == 0, run.stderr[-4000:]
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
