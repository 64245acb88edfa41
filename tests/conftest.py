import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
for path in (str(TESTS), str(ROOT)):
    if path not in sys.path:
        sys.path.insert(0, path)

# No example database: a failure found under one seed must not replay forever in one checkout
# (or CI cache), and no test may depend on a .hypothesis/ directory existing.
try:
    from hypothesis import settings
except ImportError:  # the sp tier's environment has no hypothesis and no property tests
    settings = None
if settings is not None:
    settings.register_profile("ernie", database=None)
    settings.load_profile("ernie")
