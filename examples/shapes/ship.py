"""Copy a shapes run's trained models into the package as the built-in ``shapes`` preset.

    python examples/shapes/ship.py [STAGE1 STAGE2] [--strength S] [--keep K]   # default runs/stage1 runs/stage2

Writes ``duogen_agents/weights/shapes/``: ``planner/`` (stage 1's planner, a ``from_pretrained`` folder),
``aligned/`` (stage 2's VAE, DiT and connector, without checkpoints or optimizer states) and ``preset.json``
(stage 2's preset with those folders as paths relative to it, greedy decoding, ``--strength`` and ``--keep``).
``duogen_agents.presets`` lists it as ``shapes`` when that file is there. Prints the size of what it wrote.
The inputs are checked first and the folder is built beside ``--out``, then swapped in: a mistyped run
leaves the preset there as it was.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from duogen_agents.presets import SHIPPED, load_preset, shipped_preset

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("stage1", nargs="?", type=Path, default=Path("runs/stage1"))
p.add_argument("stage2", nargs="?", type=Path, default=Path("runs/stage2"))
p.add_argument("--strength", type=float, default=1.0, help="image.strength of the preset (1.0: from pure noise)")
p.add_argument("--keep", type=float, default=0.0, help="image.keep of the preset (0: no blended sampling)")
p.add_argument("--out", type=Path, default=SHIPPED / "shapes", help="where to write (default: the package's)")
args = p.parse_args()

out = args.out.resolve()
aligned = args.stage2 / "aligned"
needed = [args.stage1 / "planner", args.stage2 / "preset.json", aligned / "aligned.json"]
needed += [aligned / part for part in ("vae", "transformer", "connector")]
if missing := [str(path) for path in needed if not path.exists()]:
    raise SystemExit(f"ship.py: not a finished stage 1 and stage 2 (missing {', '.join(missing)}); nothing changed")
for run in (args.stage1, args.stage2):
    if out == run.resolve() or run.resolve() in out.parents or out in run.resolve().parents:
        raise SystemExit(
            f"ship.py: --out {args.out} and the run {run} overlap (one holds the other); choose another folder"
        )
source = load_preset(args.stage2 / "preset.json")
meta = json.loads((args.stage2 / "aligned" / "aligned.json").read_text())
if meta.get("context", "planner") != "planner" or source.critic is not None or source.image.references is not None:
    raise SystemExit("ship.py packs a planner-states stage 2 without a critic or a reference model")
out.parent.mkdir(parents=True, exist_ok=True)
final, out = out, Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))  # built here, then swapped in
try:
    shutil.copytree(args.stage1 / "planner", out / "planner")
    for part in ("vae", "transformer", "connector"):
        shutil.copytree(aligned / part, out / "aligned" / part)
    meta["planner"] = "../planner"  # the planner whose states the connector reads, beside it
    (out / "aligned" / "aligned.json").write_text(json.dumps(meta, indent=2) + "\n")

    spec = source.model_dump(mode="json", exclude_defaults=True)
    spec["name"] = "shapes"
    spec["description"] = (
        "trained from scratch on the shapes world by examples/shapes/train.sh (2-core CPU): planner (stage 1) + "
        "aligned Cosmos DiT with the earlier picture as its frame (stage 2)"
    )
    spec["planner"]["model"] = "planner"
    spec["planner"]["temperature"] = 0.0  # greedy: the trained planner's most likely action
    spec["image"]["model"] = "aligned"
    spec["image"]["strength"] = args.strength
    spec["image"]["keep"] = args.keep
    (out / "preset.json").write_text(json.dumps(spec, indent=2) + "\n")
    shipped_preset(out)  # check it
except BaseException:
    shutil.rmtree(out, ignore_errors=True)
    raise
if final.exists():
    old = final.with_name(f".{final.name}-old")
    shutil.rmtree(old, ignore_errors=True)
    final.rename(old)
    out.rename(final)
    shutil.rmtree(old)
else:
    out.rename(final)
size = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
print(f"{final}: {size / 1e6:.1f} MB")
