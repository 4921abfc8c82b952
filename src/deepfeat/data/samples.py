"""A few real, freely licensed photos for demos, docs and tests, written on demand.

They come from scikit-image's bundled data (``pip install deepfeat[demo]``), so no
network is needed and no binary images live in this repository.
"""

from __future__ import annotations

import os
from pathlib import Path

from deepfeat.errors import UsageError

#: name -> (scikit-image loader, file name, licence line)
SAMPLES = {
    "chelsea": ("chelsea", "chelsea_cat.jpg", "Chelsea the cat. CC0, photographer Stefan van der Walt (scikit-image)."),
    "coffee": ("coffee", "coffee_espresso.jpg", "Espresso cup, courtesy of Pikolo Espresso Bar. CC0, photographer Rachel Michetti (scikit-image)."),
    "astronaut": ("astronaut", "astronaut.jpg", "Astronaut Eileen Collins. NASA, public domain (scikit-image)."),
    "rocket": ("rocket", "rocket.jpg", "Launch of DSCOVR on Falcon 9. SpaceX, released into the public domain (scikit-image)."),
    "hubble": ("hubble_deep_field", "hubble_deep_field.jpg", "Hubble eXtreme Deep Field. NASA, public domain (scikit-image)."),
}


def write_sample_photos(folder: str | os.PathLike, names: list[str] | None = None, quality: int = 92) -> list[str]:
    """Write the sample photos (JPEG) and a ``LICENSES.txt`` into *folder*; return the paths."""
    try:
        import skimage.data as skdata
    except ImportError:
        raise UsageError("sample photos need scikit-image: pip install 'deepfeat[demo]'") from None
    from PIL import Image

    out_dir = Path(folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, lines = [], []
    for name in names or list(SAMPLES):
        if name not in SAMPLES:
            raise UsageError(f"unknown sample {name!r}; choose from {', '.join(SAMPLES)}")
        loader, filename, licence = SAMPLES[name]
        path = out_dir / filename
        if not path.exists():
            Image.fromarray(getattr(skdata, loader)()).convert("RGB").save(path, quality=quality)
        paths.append(str(path))
        lines.append(f"{filename}: {licence}")
    (out_dir / "LICENSES.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths
