"""compress_on_mesh.py with a simulated crash and a record of what each process restored.

argv[1]: the config (JSON); argv[2] (optional): ``PASS:STEP``, exit with code 75 right after the
state of pass PASS at step STEP has been saved (process 0) or would have been (the others), as a
job that dies there. Every process prints ``RESTORED {process, pass, step}`` for each restore and
process 0 prints ``RESULT`` as compress_on_mesh.py does.
"""

import json
import os
import sys

import numpy as np

from replaceme_jax import checkpointing
from replaceme_jax.config import CompressConfig, from_dict
from replaceme_jax.replaceme.pipeline import compress

crash = sys.argv[2].split(":") if len(sys.argv) > 2 else None
save, restore = checkpointing.PassState.save, checkpointing.PassState.restore


def save_then_crash(self, batches_done, state, force=False):
    save(self, batches_done, state, force)
    if crash and self.directory.name == crash[0] and batches_done == int(crash[1]):
        sys.stdout.flush()
        os._exit(75)


def restore_and_tell(self, template):
    import jax

    restored = restore(self, template)
    print("RESTORED " + json.dumps({"process": jax.process_index(), "pass": self.directory.name,
                                    "step": None if restored is None else restored[0]}), flush=True)
    return restored


checkpointing.PassState.save = save_then_crash
checkpointing.PassState.restore = restore_and_tell
result = compress(from_dict(CompressConfig, json.loads(sys.argv[1])))
import jax  # noqa: E402

if jax.process_index() == 0:
    out = {"blocks": result.report["blocks"], "processes": jax.process_count(), "devices": jax.device_count(),
           "T": [np.asarray(b.T).tolist() if b.T is not None else None for b in result.blocks]}
    print("RESULT " + json.dumps(out))
