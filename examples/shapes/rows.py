"""The four rows of the shapes evaluation, as preset files, from the runs of examples/shapes/train.sh.

    python examples/shapes/rows.py            # writes runs/rows/*.json
    duogen eval --bench shapes --limit 24 --reference --out runs/eval \\
      --preset runs/rows/shapes.json --preset runs/rows/no-frames.json \\
      --preset runs/rows/prompt-only.json --preset runs/rows/untrained-frames.json
"""

from __future__ import annotations

import json
from pathlib import Path

from duogen_agents.presets import load_preset

out = Path("runs/rows")
out.mkdir(parents=True, exist_ok=True)
full = load_preset("runs/stage2/preset.json").model_dump(mode="json")
full["planner"]["temperature"] = 0.0  # greedy: the trained planner's most likely action
tiny = load_preset("tiny").model_dump(mode="json")["image"]
rows = {
    "shapes": {},  # stage 1 + stage 2: connector and frames
    "no-frames": {"image": {"frames": False}},  # the same models, earlier images withheld
    "prompt-only": {"image": {"model": str(Path("runs/stage2-t5/aligned").resolve())}},  # DiT on T5's states
    "untrained-frames": {"image": tiny},  # stage-1 planner, tiny's random Video2World frame conditioning
}
for name, change in rows.items():
    spec = json.loads(json.dumps(full))
    spec["name"] = name
    if "image" in change:
        spec["image"] = change["image"] if "family" in change["image"] else {**spec["image"], **change["image"]}
    (out / f"{name}.json").write_text(json.dumps(spec, indent=2))
    load_preset(out / f"{name}.json")  # check it
    print(out / f"{name}.json")
