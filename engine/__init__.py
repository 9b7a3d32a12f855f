"""s2v-tui training engine: models, data, training loop. Knows nothing of any user interface."""
import logging as _logging

# bitsandbytes logs an error at import on machines without its optional CPU kernels; it is harmless for us and a
# stray stderr line garbles a terminal UI.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.CRITICAL)
