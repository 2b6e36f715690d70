import logging
import os

# Tests run on CPU; keep XLA from grabbing all cores' threads for tiny shapes.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
