"""benchmarks.demo_pixels: the refactor check compares pixels, not PNG metadata."""

from PIL import Image, PngImagePlugin

from benchmarks.demo_pixels import pixel_hashes


def _write(folder, name, color, text):
    (folder / "assets").mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("editflow", text)
    Image.new("RGB", (4, 2), color).save(folder / "assets" / name, pnginfo=info)
    (folder / "assets" / (name + ".json")).write_text(text)


def test_metadata_changes_keep_the_hash_and_a_pixel_change_does_not(tmp_path):
    _write(tmp_path / "a", "x.png", (10, 20, 30), "model at /one/path")
    _write(tmp_path / "b", "x.png", (10, 20, 30), "model at /another/path")
    _write(tmp_path / "c", "x.png", (10, 20, 31), "model at /one/path")
    a, b, c = (pixel_hashes(tmp_path / n) for n in "abc")
    assert len(a) == 1 and a[0].endswith("assets/x.png")  # sidecars are not hashed
    assert a == b
    assert a != c
