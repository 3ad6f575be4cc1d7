"""Import-time noise of packages prefixtune does not use at that point, silenced before anything
imports transformers.

transformers imports torchao whenever it is installed; on a CPU build torchao then warns about
GPU-only kernel libraries it cannot load, and torch about torchao's enum registrations. Neither
concerns prefixtune (--quantize int8 uses torchao's CPU path), so they stay out of every command.
"""

import logging

for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
