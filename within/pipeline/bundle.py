"""Writing the run's bundle: as soon as the fit ends, and again after every post-fit step.

The bundle is saved into a temporary folder and then moved into place, so a crash while saving
leaves the previous bundle (or `.bundle.old`, for the instant between the two renames), never half
a bundle. Its metadata carries the run config, the metrics so far, the library versions and what
the steps recorded (each step's status included).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from within.models.base import library_versions
from within.postfit import PostfitContext

BUNDLE_DIR = "bundle"


def write_bundle(ctx: PostfitContext) -> Path:
    model = ctx.model
    steps = [{k: v for k, v in row.items() if k != "traceback"} for row in ctx.metadata.get("postfit", [])]
    model.metadata.update({"config": ctx.config, "metrics": dict(ctx.metrics), "library_versions": library_versions(),
                           **ctx.metadata, "postfit": steps})
    final, tmp, old = (ctx.out_dir / name for name in (BUNDLE_DIR, f".{BUNDLE_DIR}.tmp", f".{BUNDLE_DIR}.old"))
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    model.save(tmp)
    for name, src in ctx.bundle_files.items():
        shutil.copy2(src, tmp / name)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final
