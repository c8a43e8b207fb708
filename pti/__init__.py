"""pti: Pivotal Tuning Inversion on StyleGAN2.

Importing `pti` is cheap (no torch); the heavy parts load on first use.
"""

from pti._version import __version__  # noqa: F401 (re-export)


def __getattr__(name):
    # Lazy public API so `import pti` and `pti --help` stay fast.
    if name == "load_generator":
        from pti.engine.checkpoint import load_generator  # noqa: PLC0415  keeps `import pti` and `pti --help` light

        return load_generator
    if name == "tune":
        from pti.api import tune  # noqa: PLC0415  keeps `import pti` and `pti --help` light

        return tune
    if name == "tune_clip":
        from pti.api import tune_clip  # noqa: PLC0415  keeps `import pti` and `pti --help` light

        return tune_clip
    if name == "render":
        from pti.rendering import render  # noqa: PLC0415  keeps `import pti` and `pti --help` light

        return render
    raise AttributeError(f"module 'pti' has no attribute {name!r}")
