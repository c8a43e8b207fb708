"""Where a tuned person's files are: the identity `<out>/<name>.pti` and the folder `<out>/<name>/` beside it.

`pti tune` writes them (`pti.pipeline`), `pti render` and the studio read the aligned photo there and
write their own outputs into the same folder, and a many-photo run sweeps and records them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pti.engine.identity import SUFFIX


@dataclass(frozen=True)
class Layout:
    """A tuned person's files: the identity `<out>/<name>.pti` and, beside it, the folder `<out>/<name>/`
    with what `pti tune` wrote (aligned.png, pivot.png, reconstruction.png, report.json, contact.png) and
    what later commands add there (`pti render`'s edits/, the studio's studio/ and its GANSpace file)."""

    out: Path  # the folder the identity file is in
    name: str  # the identity file's stem (the photo's name, made unique in a run)

    @classmethod
    def of(cls, identity: str | Path) -> "Layout":
        """The layout around an identity file."""
        identity = Path(identity)
        return cls(identity.parent, identity.stem)

    @property
    def identity(self) -> Path:
        return self.out / f"{self.name}{SUFFIX}"

    @property
    def folder(self) -> Path:
        return self.out / self.name

    @property
    def aligned(self) -> Path:  # the aligned photo, what the person was tuned to
        return self.folder / "aligned.png"

    @property
    def pivot(self) -> Path:  # the pivot's render, before tuning
        return self.folder / "pivot.png"

    @property
    def reconstruction(self) -> Path:  # the pivot through the tuned generator
        return self.folder / "reconstruction.png"

    @property
    def report(self) -> Path:
        return self.folder / "report.json"

    @property
    def contact(self) -> Path:  # input | aligned | pivot | reconstruction, one sheet
        return self.folder / "contact.png"

    @property
    def edits(self) -> Path:  # `pti render`'s default output folder
        return self.folder / "edits"

    @property
    def studio(self) -> Path:  # where `pti studio` saves images and their edit strings
        return self.folder / "studio"
