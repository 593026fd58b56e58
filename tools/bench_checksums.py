"""Cost of the run-checkpoint checksums (checkpoint/integrity.py): SHA-256 of every file, on save
(write_manifest) and on resume (verify). Prints GB/s on this machine and the time for a 7B run.

    python tools/bench_checksums.py [--mb 512] [--files 8] [--run-dir RUN_DIR]

--run-dir also times a real run checkpoint (its newest step_* folder). The 7B estimate: a run
checkpoint holds, per model (policy and token RM), bf16 weights (2 B/param) plus the fp32 master
copy and two Adam moments (12 B/param): 2 x 14 B x 7.6e9 = 213 GB, hashed by every rank's share.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
import zlib
from pathlib import Path

from megatron_oreal.checkpoint.integrity import _threads, list_files, verify, write_manifest

BYTES_7B = 2 * 14 * 7.6e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=512, help="total size of the synthetic checkpoint (MiB)")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--run-dir", default="", help="also time the newest checkpoint of this run dir")
    args = ap.parse_args()

    blob = os.urandom(64 << 20)
    for name, fn in (("sha256", lambda: hashlib.sha256(blob).digest()), ("blake2b", lambda: hashlib.blake2b(blob).digest()),
                     ("md5", lambda: hashlib.md5(blob).digest()), ("crc32", lambda: zlib.crc32(blob))):
        t = time.perf_counter()
        fn()
        print(f"{name:8s} one core: {len(blob) / (time.perf_counter() - t) / 1e9:5.2f} GB/s")

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        per = (args.mb << 20) // args.files
        for i in range(args.files):
            with open(root / f"__0_{i}.distcp", "wb") as f:
                for _ in range(per // len(blob)):
                    f.write(blob)
                f.write(blob[: per % len(blob)])
        total = sum((root / n).stat().st_size for n in list_files(root))
        t = time.perf_counter()
        write_manifest(root)
        t_write = time.perf_counter() - t
        t = time.perf_counter()
        assert verify(root) == []
        t_verify = time.perf_counter() - t
        rate = total / t_verify
        print(f"synthetic checkpoint {total / 1e9:.2f} GB in {args.files} files (page cache), {_threads()} threads: "
              f"manifest {t_write:.2f} s, verify {t_verify:.2f} s ({rate / 1e9:.2f} GB/s per rank)")
        for ranks in (8, 32, 64):
            print(f"  7B run checkpoint ({BYTES_7B / 1e9:.0f} GB) over {ranks} ranks at this rate: "
                  f"{BYTES_7B / ranks / rate:.1f} s (if storage reads keep up: {BYTES_7B / 1e9:.0f} GB at the "
                  f"filesystem's aggregate bandwidth otherwise)")
    if args.run_dir:
        ck = Path(args.run_dir) / "checkpoints"
        newest = sorted(p for p in ck.glob("step_*") if p.is_dir() and not p.name.endswith(".damaged"))[-1]
        size = sum((newest / n).stat().st_size for n in list_files(newest))
        t = time.perf_counter()
        problems = verify(newest)
        print(f"{newest}: {size / 1e6:.2f} MB, verify {1e3 * (time.perf_counter() - t):.1f} ms "
              f"({'intact' if problems == [] else problems})")


if __name__ == "__main__":
    main()
