"""The rows of the shapes evaluation, as preset files, from the runs of examples/shapes/train.sh.

    python examples/shapes/rows.py [STAGE2 [STAGE2_T5]]   # writes runs/rows/*.json (default runs/stage2, runs/stage2-t5)
    duogen eval --bench shapes --limit 24 --reference --out runs/eval \\
      --preset runs/rows/shapes.json --preset runs/rows/no-frames.json \\
      --preset runs/rows/prompt-only.json --preset runs/rows/untrained-frames.json \\
      --preset runs/rows/shapes-strength-0.5.json --preset runs/rows/no-frames-strength-0.5.json \\
      --preset runs/rows/shapes-keep.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from duogen_agents.presets import load_preset

out = Path("runs/rows")
out.mkdir(parents=True, exist_ok=True)
stage2 = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/stage2")
stage2_t5 = Path(sys.argv[2] if len(sys.argv) > 2 else "runs/stage2-t5")
full = load_preset(stage2 / "preset.json").model_dump(mode="json")
full["planner"]["temperature"] = 0.0  # greedy: the trained planner's most likely action
tiny = load_preset("tiny").model_dump(mode="json")["image"]
rows = {
    "shapes": {},  # stage 1 + stage 2: connector and frames
    "no-frames": {"image": {"frames": False}},  # the same models, earlier images withheld
    "prompt-only": {"image": {"model": str((stage2_t5 / "aligned").resolve())}},  # DiT on T5's states
    "untrained-frames": {"image": tiny},  # stage-1 planner, tiny's random Video2World frame conditioning
    # sampling from the frame plus the connector's regressed change at noise 0.5 (chosen on training compositions)
    "shapes-strength-0.5": {"image": {"strength": 0.5}},
    "no-frames-strength-0.5": {"image": {"frames": False, "strength": 0.5}},
    # and blended: where the connector predicts no change, the earlier picture is kept (image.keep; without
    # frames there is no earlier picture to keep, so its no-frames row is the one above)
    "shapes-keep": {"image": {"strength": 0.5, "keep": 0.3}},
}
for name, change in rows.items():
    spec = json.loads(json.dumps(full))
    spec["name"] = name
    if "image" in change:
        spec["image"] = change["image"] if "family" in change["image"] else {**spec["image"], **change["image"]}
    (out / f"{name}.json").write_text(json.dumps(spec, indent=2))
    load_preset(out / f"{name}.json")  # check it
    print(out / f"{name}.json")
