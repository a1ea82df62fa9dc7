"""rayft: Ray-native LLM post-training.

The RL stage lives in the repository's top-level ``rl/`` folder and the serving stage in ``serving/``; both are
imported as ``rayft.rl`` and ``rayft.serving`` (PyPI already has packages named ``rl`` and ``serving``). An
installed rayft maps them in through ``package-dir`` (pyproject.toml); a checkout used in place, as under
``ray job submit --working-dir .``, has no ``rayft/rl`` folder, so the repository root joins this package's
search path and ``import rayft.rl`` finds ``<root>/rl``.
"""

from pathlib import Path as _Path

_root = _Path(__file__).resolve().parent.parent
if (_root / "rl" / "__init__.py").is_file() and not (_Path(__file__).parent / "rl").exists():
    __path__.append(str(_root))  # noqa: F821 (a package's __path__)
