"""Run the launch commands of docs/distributed.md verbatim, in order, in a scratch directory.

Every ``torchrun`` line of the document's bash blocks runs through ``bash -c`` unchanged; a line
that names ``$NODE_RANK`` is a multi-device command and runs twice at once on this machine, with
``MASTER=127.0.0.1`` and NODE_RANK 0 and 1. Exits non-zero if any command fails or times out.

    python scripts/distributed_docs_check.py [--timeout 300]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "distributed.md"


def commands(text: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("torchrun ")]


def run(line: str, cwd: Path, timeout: float) -> bool:
    envs = ([{"NODE_RANK": str(r), "MASTER": "127.0.0.1"} for r in (0, 1)] if "$NODE_RANK" in line else [{}])
    procs = [subprocess.Popen(["bash", "-c", line], cwd=cwd, env={**os.environ, "TQDM_DISABLE": "1", **e},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for e in envs]
    ok = True
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            out, _ = p.communicate()
            ok = False
        ok = ok and p.returncode == 0
        tail = [ln for ln in out.splitlines() if "accuracy" in ln or ln.startswith("error")]
        print(f"    exit {p.returncode}: {' | '.join(tail) or out.strip().splitlines()[-1:]}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per command")
    args = parser.parse_args()
    lines = commands(DOC.read_text())
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for line in lines:
            print(f"$ {line}")
            failed += not run(line, Path(tmp), args.timeout)
    print(f"{len(lines) - failed} of {len(lines)} commands of {DOC.name} ran")
    sys.exit(1 if failed or not lines else 0)


if __name__ == "__main__":
    main()
