"""Frame sampling and preprocessing on real clips, against PyAV and PIL as independent oracles."""

import time
from pathlib import Path

import av
import decord
import numpy as np
import pytest
import torch

from tinyr1.errors import VideoError
from tinyr1.video import decode_frames, load_frames, preprocess, sample_indices

VIDEOS = Path(__file__).resolve().parents[1] / "../shared/videos"  # read-only, not copied
# (file, frames, fps) as decord 0.6.0 reports them (shared/videos/README.md)
CLIPS = [("demo.mp4", 280, 28.0), ("test.avi", 164, 25.0), ("flipping_a_pancake.mkv", 310, 30.0)]
needs_clips = pytest.mark.skipif(not VIDEOS.is_dir(), reason="real clips in ../shared/videos/ are not present")


def pyav_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])  # [N, H, W, 3]


def write_clip(path: Path, frames: np.ndarray, codec: str = "libx264", fps: int = 8) -> None:
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode(None))


def test_sample_indices_match_original_linspace() -> None:
    assert sample_indices(280, 16).tolist() == [0, 18, 37, 55, 74, 93, 111, 130, 148, 167, 186, 204, 223, 241, 260, 279]
    assert sample_indices(5, 8).tolist() == [0, 0, 1, 1, 2, 2, 3, 4]  # short clip: frames repeat
    assert sample_indices(1, 4).tolist() == [0, 0, 0, 0]
    # fps mode: min(max_frames, max(1, int(duration * fps)))
    assert len(sample_indices(280, 16, fps=1.0, max_frames=16, video_fps=28.0)) == 10
    assert len(sample_indices(280, 16, fps=1.0, max_frames=4, video_fps=28.0)) == 4
    assert len(sample_indices(280, 16, fps=2.0, max_frames=64, video_fps=28.0)) == 20
    assert sample_indices(10, 16, fps=1.0, max_frames=16, video_fps=30.0).tolist() == [0]
    rng = np.random.default_rng(0)
    for _ in range(50):
        total, n = int(rng.integers(1, 2000)), int(rng.integers(1, 64))
        want = [int(i * (total - 1) / (n - 1)) if n > 1 else 0 for i in range(n)]  # naive truncation
        got = sample_indices(total, n).tolist()
        assert all(abs(g - w) <= 1 for g, w in zip(got, want)) and got[0] == 0 and got[-1] == (total - 1 if n > 1 else 0)
        assert got == sorted(got)


@needs_clips
@pytest.mark.parametrize(("name", "total", "fps"), CLIPS)
def test_real_clips_same_pixels_as_pyav(name: str, total: int, fps: float) -> None:
    path = VIDEOS / name
    frames, idx, info = decode_frames(path, 16)
    assert (info.num_frames, info.fps) == (total, fps)
    assert idx.tolist() == np.linspace(0, total - 1, 16, dtype=int).tolist()
    ref = pyav_frames(path)
    assert len(ref) == total
    assert frames.dtype == np.uint8 and frames.shape == (16, *ref.shape[1:])
    np.testing.assert_array_equal(frames, ref[idx])  # exact: same decoder output
    assert (info.width, info.height) == (ref.shape[2], ref.shape[1])


@needs_clips
def test_preprocess_matches_pil_bicubic_within_one_level() -> None:
    Image = pytest.importorskip("PIL.Image")
    frames, _, _ = decode_frames(VIDEOS / "demo.mp4", 4)
    for size in (384, 224, 32):
        x = preprocess(frames, size)  # [T, 3, S, S]
        assert x.shape == (4, 3, size, size) and x.dtype == torch.float32
        ref = np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC)) for f in frames])
        ref_t = (torch.from_numpy(ref).permute(0, 3, 1, 2).double() / 255 - 0.5) / 0.5
        diff = (x.double() - ref_t).abs() * 127.5  # in uint8 levels
        assert diff.max().item() <= 1.0 + 1e-4
        assert diff.mean().item() < 0.05


def test_preprocess_identity_size_is_exact() -> None:
    frames = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    x = preprocess(frames, 32)
    ref = (frames.astype(np.float64).transpose(0, 3, 1, 2) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(x.numpy(), ref, atol=1e-6)
    assert x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize(("suffix", "codec"), [("mp4", "libx264"), ("mkv", "libx264"), ("mov", "libx264"), ("avi", "mpeg4")])
def test_containers_and_short_clip(tmp_path: Path, suffix: str, codec: str) -> None:
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, (5, 48, 64, 3), dtype=np.uint8)
    path = tmp_path / f"clip.{suffix}"
    write_clip(path, src, codec)
    ref = pyav_frames(path)
    assert len(ref) == 5
    frames, idx, info = decode_frames(path, 16)  # shorter than num_frames: indices repeat
    assert info.num_frames == 5 and idx.tolist() == np.linspace(0, 4, 16, dtype=int).tolist()
    np.testing.assert_array_equal(frames, ref[idx])
    pixels = load_frames(path, 16, 32)
    assert pixels.shape == (16, 3, 32, 32)
    torch.testing.assert_close(pixels, preprocess(ref[idx], 32))


@pytest.mark.parametrize("size", [16, 48])
def test_sizes_decord_cannot_copy_fall_back_to_identical_pyav_pixels(tmp_path: Path, size: int) -> None:
    src = np.random.default_rng(size).integers(0, 256, (6, size, size, 3), dtype=np.uint8)
    path = tmp_path / "small.mp4"
    write_clip(path, src)
    frames, idx, info = decode_frames(path, 8)
    np.testing.assert_array_equal(frames, pyav_frames(path)[idx])
    assert (info.width, info.height) == (size, size)


def test_broken_files_raise_typed_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.mp4"
    write_clip(good, np.zeros((8, 32, 32, 3), dtype=np.uint8))
    data = good.read_bytes()
    cases = {
        "missing.mp4": (None, "not found"),
        "empty.mp4": (b"", "empty"),
        "text.mp4": (b"not a video\n" * 20, "cannot open"),
        "truncated.mp4": (data[: len(data) // 2], "cannot open"),
    }
    for name, (content, cause) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        start = time.perf_counter()
        with pytest.raises(VideoError) as err:
            load_frames(path, 8, 32)
        assert str(path) in str(err.value) and cause in str(err.value)
        assert time.perf_counter() - start < 10
    with pytest.raises(VideoError, match="not a regular file"):
        load_frames(tmp_path, 8, 32)


def test_watchdog_turns_a_hung_decoder_into_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "stuck.mp4"
    write_clip(path, np.zeros((4, 32, 32, 3), dtype=np.uint8))
    monkeypatch.setattr(decord, "VideoReader", lambda *args, **kwargs: time.sleep(5))  # a decoder that hangs
    start = time.perf_counter()
    with pytest.raises(VideoError, match=r"stuck\.mp4: decoding did not finish within"):
        decode_frames(path, 4, timeout_s=0.2)
    assert time.perf_counter() - start < 2


# ---- issue 16, item 10: rotation in the PyAV path, decord's own stderr lines, huge frames --------
def write_rotated_clip(path: Path, frames: np.ndarray, degrees: int) -> None:
    """An H.264 clip whose container says "display rotated by `degrees`" (as phone videos do)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.set_display_rotation(degrees)
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def halves(frames: int, h: int, w: int) -> np.ndarray:
    """Red left half, blue right half: which way the picture turned is plain to see."""
    out = np.zeros((frames, h, w, 3), dtype=np.uint8)
    out[:, :, : w // 2] = (250, 0, 0)
    out[:, :, w // 2 :] = (0, 0, 250)
    return out


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_the_pyav_path_turns_frames_as_decord_does(tmp_path: Path, degrees: int) -> None:
    """decord applies the display rotation; the PyAV path (decord's copy-bug fallback, huge frames)
    must give the same pixels, not the stored, unrotated ones."""
    from tinyr1.video import pyav_frames as tinyr1_pyav_frames

    path = tmp_path / "rot.mp4"
    write_rotated_clip(path, halves(4, 32, 64), degrees)
    want = decord.VideoReader(str(path)).get_batch([0, 3]).asnumpy()
    got = tinyr1_pyav_frames(path, np.array([0, 3]))
    assert got.shape == want.shape and want.shape[1:3] == ((64, 32) if degrees != 180 else (32, 64))
    np.testing.assert_array_equal(got, want)


def test_a_rotated_clip_of_a_size_decord_cannot_copy_is_turned(tmp_path: Path) -> None:
    path = tmp_path / "rot48.mp4"
    write_rotated_clip(path, halves(4, 48, 32), 90)  # shown 48 px wide: decord's copy bug, PyAV decodes it
    frames, _, info = decode_frames(path, 2)
    assert (info.width, info.height) == (48, 32)  # stored portrait, shown landscape
    top, bottom = frames[0, 2, 24], frames[0, -3, 24]
    assert top[2] > 200 > top[0] and bottom[0] > 200 > bottom[2]  # counter-clockwise: right half on top


def test_huge_frames_are_decoded_at_reduced_resolution(tmp_path: Path) -> None:
    """Frames above `max_pixels` (default 4K UHD; an 8K clip cost 8.4 GB of RAM per load) are
    decoded straight to a size within the budget, aspect kept, same picture."""
    path = tmp_path / "big.mp4"
    src = halves(6, 96, 128)
    write_clip(path, src)
    frames, _, info = decode_frames(path, 3, max_pixels=64 * 48)
    assert frames.shape == (3, 48, 64, 3) and (info.width, info.height) == (64, 48)
    assert frames[:, :, :28, 0].min() > 200 and frames[:, :, 36:, 2].min() > 200  # red left, blue right
    full, _, _ = decode_frames(path, 3)
    assert full.shape == (3, 96, 128, 3)


def test_decord_never_prints_its_own_error_lines(tmp_path: Path) -> None:
    """A broken file is one VideoError; decord's "ERROR opening" line used to reach stderr too."""
    import subprocess
    import sys

    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    code = (f"from tinyr1.video import decode_frames\ntry:\n    decode_frames(r'{bad}', 4)\n"
            "except Exception as e:\n    print(type(e).__name__)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "VideoError" and "ERROR opening" not in proc.stderr, proc.stderr
