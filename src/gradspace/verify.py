"""``gradspace verify-stores``: find corrupt or incomplete stores of an experiment and
remove (or quarantine) them, so that the next ``snakemake`` run rebuilds exactly those.

    gradspace verify-stores results/<experiment>            # report; exit 1 if any is bad
    gradspace verify-stores results/<experiment> --remove   # delete the bad ones
    gradspace verify-stores results/<experiment> --quarantine results/quarantine

The default check reads every byte (each file's CRC-32 against the store's completion
record, and every chunk decoded with its CRC-32C); ``--quick`` only checks that every
recorded file exists with its recorded size (what the workflow does at start-up and every
job does when it opens a store). Snakemake rebuilds a removed store because its output is
missing and forced (``--forcerun <store>``, printed by ``--remove``; without it Snakemake
leaves a missing intermediate output alone while its dependents are up to date), and
reruns the jobs downstream of it.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path

from .errors import StoreError

log = logging.getLogger(__name__)


def verify_command(root, full: bool = True, remove: bool = False, quarantine=None,
                   out=None) -> int:
    """Check every store under ``root``; returns the exit status (0: none left broken).
    ``out``: where the report goes (the current ``sys.stdout`` when None)."""
    from .store import find_stores, verify_stores

    out = sys.stdout if out is None else out
    root = Path(root)
    if not root.is_dir():
        raise StoreError(f"{root} is not a directory (give results/<experiment>)")
    t0 = time.perf_counter()
    n = len(find_stores(root))
    bad = verify_stores(root, full=full)
    kind = "full (checksums, decoding)" if full else "quick (file sizes)"
    print(f"checked {n} store(s) under {root} [{kind}] in {time.perf_counter() - t0:.1f}s: "
          f"{len(bad)} broken", file=out)
    for store, problem in bad:
        print(f"BROKEN {store}: {problem}", file=out)
        if remove:
            shutil.rmtree(store)
            print(f"  removed {store}", file=out)
        elif quarantine:
            dest = Path(quarantine) / store.relative_to(root)
            if dest.exists():
                dest = dest.with_name(f"{dest.name}.{int(time.time())}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(store), str(dest))
            print(f"  moved to {dest}", file=out)
    if bad and (remove or quarantine):
        # Snakemake does not rebuild a missing intermediate output whose dependents are up
        # to date: force the removed stores (and so everything downstream of them).
        print("rebuild them and what depends on them with your snakemake command plus:\n"
              "  --forcerun " + " ".join(str(s) for s, _ in bad), file=out)
        return 0
    if bad:
        print(f"to rebuild them: gradspace verify-stores {root} --remove, then snakemake again",
              file=out)
    return 1 if bad else 0
