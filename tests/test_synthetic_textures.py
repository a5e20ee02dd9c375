import numpy as np
from PIL import Image

from dataset_readers.synthetic_textures import KINDS, generate
from methods.glass_las import list_textures


def test_layout_determinism_and_variety(tmp_path):
    a = generate(tmp_path / "a", per_class=2, size=64, seed=3)
    b = generate(tmp_path / "b", per_class=2, size=64, seed=3)
    c = generate(tmp_path / "c", per_class=2, size=64, seed=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert len(files) == 2 * len(KINDS) and {f.parts[0] for f in files} == set(KINDS)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)
    imgs = [np.asarray(Image.open(a / f), dtype=np.float32) for f in files]
    assert all(im.shape == (64, 64, 3) for im in imgs)
    assert min(im.std() for im in imgs) > 5  # every image has texture, none is flat
    # the GLASS texture reader accepts the folder as a DTD stand-in
    assert len(list_textures(a)) == len(files)
