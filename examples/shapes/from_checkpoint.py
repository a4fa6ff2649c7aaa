"""OUT/aligned and OUT/preset.json of runs/stage2 from its step-N checkpoint, as the fifth shapes run did (its
planner-states stage 2 was stopped at step 7,000 for the session's time).

    python examples/shapes/from_checkpoint.py 7000

The VAE (with its latent statistics) is the T5 run's (runs/stage2-t5): the same --vae-from VAE, measured on
the same pictures. The planner is runs/stage1b's.
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

from duogen_agents.presets import load_preset
from duogen_agents.training.stage2 import write_aligned

step = int(sys.argv[1])
run, t5 = Path("runs/stage2"), Path("runs/stage2-t5")
ckpt = run / "dit" / "checkpoints" / f"step-{step}"
needed = [ckpt / "transformer", ckpt / "connector", t5 / "aligned" / "vae", t5 / "aligned" / "aligned.json"]
if missing := [str(path) for path in needed if not path.exists()]:
    raise SystemExit(f"from_checkpoint.py: missing {', '.join(missing)}; nothing changed")
final = run / "aligned"
built = Path(tempfile.mkdtemp(prefix=".aligned-", dir=run))  # built here, then swapped in
shutil.copytree(t5 / "aligned" / "vae", built / "vae")
shutil.copytree(ckpt / "transformer", built / "transformer")
shutil.copytree(ckpt / "connector", built / "connector")
if final.exists():
    shutil.rmtree(final)
built.rename(final)
meta = json.loads((t5 / "aligned" / "aligned.json").read_text())
preset = load_preset(Path("runs/stage1b/preset.json"))
write_aligned(run, preset, Path("runs/stage1b/planner"), size=meta["size"], tokens=meta["tokens"], context="planner")
print(final, "from", ckpt)
