"""Videos of evaluation episodes: MP4 through Gymnasium's RecordVideo (moviepy), GIF fallback with Pillow."""
import gymnasium as gym
import pytest
from PIL import Image

from proxrl.control.video import record_episodes, video_format
from proxrl.errors import UserError

pytest.importorskip("pygame")  # CartPole's rgb_array rendering (gymnasium[classic-control])


def _lean(obs):
    """Push the cart away from the pole's lean: a deterministic policy with short (~10 step) episodes."""
    return int(obs[2] < 0)


def _episode_lengths(seed, episodes):
    env = gym.make("CartPole-v1")
    lengths = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed if i == 0 else None)
        for t in range(1, 10_000):
            obs, _, terminated, truncated, _ = env.step(_lean(obs))
            if terminated or truncated:
                break
        lengths.append(t)
    return lengths


def test_gif_has_one_frame_per_step(tmp_path):
    paths = record_episodes(_lean, "CartPole-v1", tmp_path, episodes=2, seed=2, fmt="gif")
    assert [p.name for p in paths] == ["eval-episode-0.gif", "eval-episode-1.gif"]
    assert _episode_lengths(2, 2) == [9, 8]  # distinct lengths: the episodes' order and seeding are checked
    for path, steps in zip(paths, _episode_lengths(2, 2)):
        with Image.open(path) as im:
            assert im.size == (600, 400)
            # Pillow merges identical consecutive frames (adding their durations): count 20 ms frames instead
            total_ms = 0
            for k in range(im.n_frames):
                im.seek(k)
                total_ms += im.info["duration"]
        assert total_ms == 20 * (steps + 1)  # the reset frame + one per step, at CartPole's 50 fps


def test_mp4_through_record_video(tmp_path):
    pytest.importorskip("moviepy")
    iio = pytest.importorskip("imageio.v3")
    paths = record_episodes(_lean, "CartPole-v1", tmp_path / "v", episodes=2, seed=5, name_prefix="cp")
    assert [p.name for p in paths] == ["cp-episode-0.mp4", "cp-episode-1.mp4"]
    for path, steps in zip(paths, _episode_lengths(5, 2)):
        frames = iio.imread(path)
        assert frames.shape[1:] == (400, 600, 3)
        assert abs(frames.shape[0] - (steps + 1)) <= 1  # the decoder may drop the final frame


def test_max_steps_cuts_episodes(tmp_path):
    (path,) = record_episodes(lambda obs: 0, "CartPole-v1", tmp_path, seed=0, fmt="gif", max_steps=3)
    with Image.open(path) as im:
        total_ms = sum((im.seek(k), im.info["duration"])[1] for k in range(im.n_frames))
    assert total_ms <= 20 * 4


def test_atari_video_is_real_time(tmp_path):
    pytest.importorskip("ale_py")
    pytest.importorskip("cv2")
    (path,) = record_episodes(lambda obs: 1, "ALE/Breakout-v5", tmp_path, seed=0, fmt="gif", max_steps=20)
    with Image.open(path) as im:
        assert im.size == (160, 210)  # the emulator's RGB screen, not the 84x84 observation
        im.seek(1)
        assert im.info["duration"] == 70  # one frame per agent step = 4 emulator frames at 60 Hz: 15 fps, in 1/100 s


def test_bad_video_requests(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="not one of"):
        record_episodes(_lean, "CartPole-v1", tmp_path, fmt="avi")
    with pytest.raises(UserError, match="at least 1"):
        record_episodes(_lean, "CartPole-v1", tmp_path, episodes=0)
    with pytest.raises(UserError, match="render_mode='rgb_array'"):
        record_episodes(_lean, "CartPole-v1", tmp_path, env_fn=lambda: gym.make("CartPole-v1"))
    import sys

    monkeypatch.setitem(sys.modules, "moviepy", None)  # not installed
    assert video_format("auto") == "gif"
    with pytest.raises(UserError, match=r"pip install 'proxrl\[video\]'"):
        video_format("mp4")
